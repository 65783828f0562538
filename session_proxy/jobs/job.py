"""One background job: an exec whose output goes to rings instead of a response.

The command is started and ended through the same backend seam as ``/exec`` (so on Kubernetes
it holds its exec stream, with pings, the dead-man switch and warm execs, as an exec does), but
nobody streams it: the job reads its command's output as fast as it comes and keeps the newest
bytes of each stream (``OutputRing``), so a job never waits for a reader and never grows.

A job ends on its own, at its deadline (``timeout``), when asked (``stop``: ``killed`` by
DELETE, ``shutdown`` with the proxy), or when the backend fails; every end but a clean exit
terminates the whole group (TERM, grace, KILL), and a clean exit still ends its leftovers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..backends.base import ExecBackend, ExecSpec, Execution, ExitStatus
from ..errors import ProxyError
from ..logs import argv_digest
from ..models import Guarantees
from .models import JOB_STREAMS, JobDocument, JobEndReason, JobExitEvent, JobState, JobStream
from .ring import OutputRing

log = logging.getLogger(__name__)


class Job:
    def __init__(self, spec: ExecSpec, backend: ExecBackend, *, ring_bytes: int, kill_grace: float) -> None:
        self.spec = spec
        self.created = time.time()
        self.rings = {stream: OutputRing(ring_bytes) for stream in JOB_STREAMS}
        self.state: JobState = "starting"
        self.target = ""
        self.warm = False
        self.guarantees: Guarantees | None = None
        self.waiting: str | None = None
        self.exit: JobExitEvent | None = None
        # Why the job could not start, if it failed before it ran or waited: the POST answers
        # with this error (as /exec would) and the job is not kept.
        self.start_error: ProxyError | None = None
        self._waited = False
        self.settled = asyncio.Event()  # started, waiting or ended: the POST may answer
        self._backend = backend
        self._kill_grace = kill_grace
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._stop_reason: JobEndReason | None = None
        self._starting: asyncio.Future[Execution] | None = None
        self._timer: asyncio.Timeout | None = None

    @property
    def job_id(self) -> str:
        return self.spec.exec_id

    def stop(self, reason: JobEndReason) -> None:
        """End the job now (the whole group); a command not started yet never starts.

        A start still waiting for the workspace is cancelled; one past that point is let finish
        and its command then ended at once (cancelling there could lose a started command).
        """
        if self._stop_reason is not None or self.exit is not None:
            return
        self._stop_reason = reason
        if self._starting is not None and self.waiting is not None:
            self._starting.cancel()
        if self._timer is not None and not self._timer.expired():
            self._timer.reschedule(self._loop.time())

    async def wait_for_change(self, timeout: float | None) -> None:
        """Wait until output arrives or the state changes, at most ``timeout`` seconds."""
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Start, keep output, end; never raises (the outcome is the exit event)."""
        try:
            status, reason = await self._start_and_pump()
        except ProxyError as error:
            if self.state == "starting" and not self._waited:
                self.start_error = error
            failed: JobEndReason = self._stop_reason or "error"
            status, reason = ExitStatus(None, reason="error", message=error.message), failed
        except Exception as error:
            log.exception("job failed", extra={"job_id": self.job_id})
            message = f"internal error ({type(error).__name__}); see the proxy's log"
            status, reason = ExitStatus(None, reason="error", message=message), "error"
        self._finish(status, reason)

    async def _start_and_pump(self) -> tuple[ExitStatus, JobEndReason]:
        execution = await self._start()
        if execution is None:
            assert self._stop_reason is not None
            return ExitStatus(None), self._stop_reason
        try:
            ended_by = await self._pump(execution)
        finally:
            # Shielded: ending the group must finish even if this task is cancelled.
            await asyncio.shield(_terminate(execution, self._kill_grace))
        if ended_by == "exited":
            status = execution.exit_status()
            return status, status.reason
        return ExitStatus(None), ended_by

    async def _start(self) -> Execution | None:
        """The running command, or None when a stop came while it waited for the workspace."""
        if self._stop_reason is not None:
            return None
        self._starting = asyncio.ensure_future(self._backend.start(self.spec, _WaitReport(self)))
        try:
            execution = await self._starting
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stop_reason is None or (task is not None and task.cancelling()):
                raise
            return None
        finally:
            self._starting = None
        self.state = "running"
        self.waiting = None
        self.target = execution.target
        self.warm = execution.warm
        self.guarantees = execution.guarantees
        self._changed_now()
        return execution

    async def _pump(self, execution: Execution) -> JobEndReason:
        """Keep output until the command exits or the deadline or a stop ends it; why it ended."""
        deadline = self._loop.time() if self._stop_reason else self.spec.deadline
        try:
            async with asyncio.timeout_at(deadline) as timer:
                self._timer = timer
                while (chunk := await execution.next_chunk()) is not None:
                    self.rings[chunk.stream].append(chunk.data)
                    self._changed_now()
            return "exited"
        except TimeoutError:
            if self._timer is None or not self._timer.expired():
                raise
            return self._stop_reason or "timeout"
        finally:
            self._timer = None

    async def _on_waiting(self, message: str) -> None:
        self._waited = True
        self.waiting = message
        self._changed_now()

    def _wait_over(self) -> None:
        self.waiting = None  # from here a stop lets the start finish, then ends what it started

    def _changed_now(self) -> None:
        self.settled.set()
        self._changed.set()
        self._changed = asyncio.Event()

    def _finish(self, status: ExitStatus, reason: JobEndReason) -> None:
        stdout, stderr = self.rings["stdout"], self.rings["stderr"]
        self.exit = JobExitEvent(
            exit_code=status.exit_code,
            signal=status.signal,
            reason=reason,
            duration_ms=int((self._loop.time() - self.spec.arrived) * 1000),
            stdout_bytes=stdout.end,
            stderr_bytes=stderr.end,
            truncated=bool(stdout.start or stderr.start),
            message=status.message,
        )
        self.state = "ended"
        self.waiting = None
        self._changed_now()
        if self.start_error is None:  # else the refusal is logged and counted as one
            self._log_line()

    def _log_line(self) -> None:
        assert self.exit is not None
        extra: dict[str, Any] = {
            "job_id": self.job_id,
            "target": self.target,
            "argv_sha256": argv_digest(self.spec.argv),
            "duration_ms": self.exit.duration_ms,
            "exit_code": self.exit.exit_code,
            "signal": self.exit.signal,
            "stdout_bytes": self.exit.stdout_bytes,
            "stderr_bytes": self.exit.stderr_bytes,
            "dropped_bytes": self.rings["stdout"].start + self.rings["stderr"].start,
            "outcome": self.exit.reason,
            "warm": self.warm,
        }
        if log.isEnabledFor(logging.DEBUG):
            extra["argv"] = self.spec.argv
        log.info("job finished", extra=extra)

    def document(self) -> JobDocument:
        streams = {
            name: JobStream(start=ring.start, end=ring.end, dropped=ring.start)
            for name, ring in self.rings.items()
        }
        return JobDocument(
            job_id=self.job_id,
            command=self.spec.argv,
            state=self.state,
            target=self.target,
            warm=self.warm,
            guarantees=self.guarantees,
            created=self.created,
            timeout=self.spec.timeout,
            stdout=streams["stdout"],
            stderr=streams["stderr"],
            exit=self.exit,
            waiting=self.waiting,
        )


async def _terminate(execution: Execution, grace: float) -> None:
    try:
        await execution.terminate(grace)
    finally:
        await execution.close()


class _WaitReport:
    """The job's ``on_waiting``: a wait shows in the job; ``wait_over`` ends the phase in which a
    stop may cancel the start (it has created nothing yet)."""

    def __init__(self, job: Job) -> None:
        self._job = job

    async def __call__(self, message: str) -> None:
        await self._job._on_waiting(message)

    def wait_over(self) -> None:
        self._job._wait_over()
