"""Background jobs from the CLI (`exec --background`, `jobs list|output|follow|kill`) and from
the async client."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from session_proxy.client import ExecClient, ProxyRefused
from session_proxy.jobs.models import CursorEvent, JobExitEvent, JobOutputEvent

from .conftest import ProxyProcess, RunningProxy, forking, survivors, wait_for_processes


def run(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "session_proxy", *args[:1], "--url", url, *args[1:]],
        capture_output=True,
        timeout=60,
        env=dict(os.environ),
    )


@pytest.fixture
def served(spawn_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return spawn_proxy("--kill-grace", "1")


def test_background_then_follow_exits_with_the_jobs_code(served: ProxyProcess) -> None:
    """`exec --background` prints a job id at once; `jobs follow` prints the job's output on
    the right streams, byte for byte, and exits with the job's own code."""
    started = run(served.url, "exec", "--background", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.decode().strip()
    assert len(job_id) == 16
    followed = run(served.url, "jobs", "follow", job_id)
    assert (followed.stdout, followed.stderr, followed.returncode) == (b"out\n", b"err\n", 3)
    listed = run(served.url, "jobs", "list")
    assert listed.stdout.decode().startswith(f"{job_id}  ended:exited:3 "), listed.stdout


def test_kill_ends_the_job_and_its_group(served: ProxyProcess, marker: str) -> None:
    """`jobs kill` ends a running job and everything it started; `jobs list` shows it killed."""
    job_id = run(served.url, "exec", "--background", "--", *forking(marker)).stdout.decode().strip()
    listed = run(served.url, "jobs", "list").stdout.decode()
    assert f"{job_id}  running " in listed, listed
    killed = run(served.url, "jobs", "kill", job_id)
    assert killed.returncode == 0, killed.stderr
    assert b"(killed)" in killed.stderr
    assert "ended:killed" in run(served.url, "jobs", "list").stdout.decode()


def test_unknown_job_exits_125_with_the_reason(served: ProxyProcess) -> None:
    result = run(served.url, "jobs", "output", "nope")
    assert result.returncode == 125
    assert b"404 job_not_found" in result.stderr


async def test_async_client_starts_reads_and_ends_jobs(proxy: RunningProxy, marker: str) -> None:
    """The client starts a job, reads its output from an offset (waiting for it), lists it and
    ends it; the output events carry offsets, the read ends with a cursor."""
    script = f"printf 'abcdef'; sleep {marker}"
    async with ExecClient(proxy.url) as client:
        job = await client.start_job(["sh", "-c", script])
        await wait_for_processes(marker, 1)
        events = [event async for event in client.job_output(job.job_id, stdout=2, wait=10)]
        assert isinstance(events[0], JobOutputEvent)
        assert (events[0].offset, events[0].data) == (2, "cdef")
        assert isinstance(events[-1], CursorEvent)
        assert (events[-1].stdout, events[-1].done) == (6, False)
        assert [j.job_id for j in await client.jobs()] == [job.job_id]
        ended = await client.end_job(job.job_id)
        assert ended.exit is not None
        assert ended.exit.reason == "killed"
        tail = [event async for event in client.job_output(job.job_id, stdout=6)]
        assert isinstance(tail[0], JobExitEvent)
        with pytest.raises(ProxyRefused, match="job_not_found"):
            await client.job("nope")
    assert await survivors(marker, within=5) == []
