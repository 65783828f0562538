"""Every job of one proxy: the cap on running jobs, their tasks, and forgetting ended ones.

Memory stays bounded whatever callers do: at most ``max_jobs`` run at once, an ended job is
kept ``job_retention`` seconds and at most ``KEPT_PER_RUNNING`` times ``max_jobs`` ended jobs
are kept (the oldest go first), each with two rings of at most ``job_output_bytes``.
Jobs end with the proxy: ``stop_all`` at the start of a shutdown, ``close`` waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from ..backends.base import ExecBackend, ExecSpec
from ..errors import NotFound, TooManyRequests
from ..metrics import Metrics
from ..settings import Settings
from ..streaming import shutting_down
from .job import Job
from .models import JobEndReason

log = logging.getLogger(__name__)

KEPT_PER_RUNNING: Final = 4
CLOSE_SLACK: Final = 2.0


class JobNotFound(NotFound):
    code = "job_not_found"


class JobRegistry:
    def __init__(self, settings: Settings, backend: ExecBackend, metrics: Metrics) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = metrics
        self._jobs: dict[str, Job] = {}  # in creation order
        self._tasks: dict[str, asyncio.Task[None]] = {}  # running jobs: their slot in the cap
        self._forget_timers: dict[str, asyncio.TimerHandle] = {}
        self._closing = False

    @property
    def running(self) -> int:
        """Jobs whose command group is not gone yet (what ``--max-jobs`` counts)."""
        return len(self._tasks)

    def check_room(self) -> None:
        """Raise 429 ``job_limit`` when ``--max-jobs`` jobs are running."""
        if self.running >= self._settings.max_jobs:
            raise TooManyRequests(
                f"{self.running} jobs are running, the configured maximum (--max-jobs "
                f"{self._settings.max_jobs}); end one (DELETE /jobs/{{id}}) or wait for one to end",
                retry_after=1,
                code="job_limit",
            )

    async def start(self, spec: ExecSpec) -> Job:
        """Create and start a job; returns once it runs, waits for the workspace, or ended."""
        if self._closing:
            raise shutting_down()
        self.check_room()
        job = Job(
            spec,
            self._backend,
            ring_bytes=self._settings.job_output_bytes,
            kill_grace=self._settings.kill_grace,
        )
        self._jobs[job.job_id] = job
        self._tasks[job.job_id] = asyncio.create_task(self._run(job), name=f"job-{job.job_id}")
        self._metrics.jobs_running.inc()
        # Shielded: a client hanging up now leaves a job that runs (as it would a moment later).
        await asyncio.shield(job.settled.wait())
        if job.start_error is not None:
            raise job.start_error
        return job

    async def _run(self, job: Job) -> None:
        try:
            await job.run()
        finally:
            self._ended(job)

    def _ended(self, job: Job) -> None:
        """The job's group is gone: free its slot, count it, and keep it for the retention."""
        del self._tasks[job.job_id]
        self._metrics.jobs_running.dec()
        if job.start_error is not None:
            self._jobs.pop(job.job_id, None)  # refused, not a job: nothing to keep or count
            return
        outcome = job.exit.reason if job.exit else "error"
        self._metrics.jobs.labels(outcome=outcome).inc()
        dropped = self._metrics.job_output_dropped_bytes
        for stream, ring in job.rings.items():
            dropped.labels(stream=stream).inc(ring.start)
        if not self._closing:
            loop = asyncio.get_running_loop()
            retention = self._settings.job_retention
            self._forget_timers[job.job_id] = loop.call_later(retention, self._forget, job.job_id)
            self._forget_beyond_keep()

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        timer = self._forget_timers.pop(job_id, None)
        if timer is not None:
            timer.cancel()

    def _forget_beyond_keep(self) -> None:
        ended = [job_id for job_id, job in self._jobs.items() if job.exit is not None]
        for job_id in ended[: max(0, len(ended) - KEPT_PER_RUNNING * self._settings.max_jobs)]:
            self._forget(job_id)

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(
                f"no job {job_id[:40]!r}: it never existed, or it ended more than "
                f"{self._settings.job_retention:g} s ago (--job-retention) and was forgotten"
            )
        return job

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    async def end(self, job_id: str) -> Job:
        """End a job (``killed``) and return it once its group is gone."""
        job = self.get(job_id)
        job.stop("killed")
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return job

    def stop_all(self, reason: JobEndReason = "shutdown") -> None:
        """End every job now; no job starts after this."""
        self._closing = True
        for job in self._jobs.values():
            job.stop(reason)

    async def close(self) -> None:
        """End every job and wait (bounded by the kill grace) until their groups are gone."""
        self.stop_all()
        tasks = list(self._tasks.values())
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.kill_grace + CLOSE_SLACK):
                    await asyncio.gather(*tasks, return_exceptions=True)
        for task in self._tasks.values():
            log.warning("job still ending at exit", extra={"job": task.get_name()})
        for timer in self._forget_timers.values():
            timer.cancel()
        self._forget_timers.clear()
