"""``session-proxy exec --background`` and ``session-proxy jobs``: background jobs from a shell.

``exec --background`` prints the new job's id and returns; ``jobs list`` prints one line per
job; ``jobs output ID`` prints what the job wrote (``--follow``: until it ends, then exits with
its code, as ``exec`` would); ``jobs kill ID`` ends it. Output goes to this process's stdout
and stderr byte for byte; bytes that fell out of the job's ring are noted on stderr.
"""

from __future__ import annotations

import base64
import sys
from typing import BinaryIO

from .client import ExecClient, ProxyClientError
from .exec_command import EXIT_PROXY_FAILURE, exit_code_for
from .jobs.models import CursorEvent, JobDocument, JobExitEvent, JobOutputEvent, LostEvent
from .models import ExitEvent


async def start_background(
    command: list[str],
    *,
    url: str | None,
    workdir: str | None,
    env: dict[str, str],
    stdin: bytes | None,
    timeout: float | None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    out, err = stdout or sys.stdout.buffer, stderr or sys.stderr.buffer
    try:
        async with ExecClient(url) as client:
            job = await client.start_job(command, workdir=workdir, env=env, stdin=stdin, timeout=timeout)
    except ProxyClientError as error:
        return _failed(err, error)
    out.write(f"{job.job_id}\n".encode())
    out.flush()
    return 0


def describe(job: JobDocument) -> str:
    """One line: id, state (or how it ended), bytes written, the command."""
    state: str = job.state
    if job.exit is not None:
        code = job.exit.exit_code if job.exit.exit_code is not None else "-"
        state = f"ended:{job.exit.reason}:{code}"
    written = job.stdout.end + job.stderr.end
    return f"{job.job_id}  {state:<24} {written:>10}B  {' '.join(job.command)[:200]}"


async def list_jobs(
    *, url: str | None, stdout: BinaryIO | None = None, stderr: BinaryIO | None = None
) -> int:
    out, err = stdout or sys.stdout.buffer, stderr or sys.stderr.buffer
    try:
        async with ExecClient(url) as client:
            jobs = await client.jobs()
    except ProxyClientError as error:
        return _failed(err, error)
    for job in jobs:
        out.write(describe(job).encode("utf-8", "replace") + b"\n")
    out.flush()
    return 0


async def job_output(
    job_id: str,
    *,
    url: str | None,
    follow: bool,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Print the job's kept output; following, until the end, then exit with the job's code."""
    out, err = stdout or sys.stdout.buffer, stderr or sys.stderr.buffer
    try:
        async with ExecClient(url) as client:
            async for event in client.job_output(job_id, follow=follow):
                if isinstance(event, JobOutputEvent):
                    sink = out if event.type == "stdout" else err
                    sink.write(_payload(event))
                    sink.flush()
                elif isinstance(event, LostEvent):
                    note = f"session-proxy: {event.bytes} bytes of {event.stream} fell out of the ring\n"
                    err.write(note.encode())
                elif isinstance(event, JobExitEvent):
                    return _exit_code(event)
                elif isinstance(event, CursorEvent) and follow:
                    return EXIT_PROXY_FAILURE  # a follow ends with the exit event
    except ProxyClientError as error:
        return _failed(err, error)
    return 0


async def kill_job(job_id: str, *, url: str | None, stderr: BinaryIO | None = None) -> int:
    err = stderr or sys.stderr.buffer
    try:
        async with ExecClient(url) as client:
            job = await client.end_job(job_id)
    except ProxyClientError as error:
        return _failed(err, error)
    assert job.exit is not None
    err.write(f"session-proxy: job {job.job_id} ended ({job.exit.reason})\n".encode())
    return 0


def _payload(event: JobOutputEvent) -> bytes:
    if event.data_b64 is not None:
        return base64.b64decode(event.data_b64)
    return (event.data or "").encode("utf-8")


def _exit_code(event: JobExitEvent) -> int:
    if event.reason == "killed":
        return EXIT_PROXY_FAILURE
    return exit_code_for(ExitEvent.model_validate(event.model_dump()))


def _failed(err: BinaryIO, error: ProxyClientError) -> int:
    err.write(f"session-proxy: {error}\n".encode())
    err.flush()
    return EXIT_PROXY_FAILURE
