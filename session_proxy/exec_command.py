"""``session-proxy exec``: stream a command's output to this terminal, byte for byte."""

from __future__ import annotations

import sys
from typing import BinaryIO

from .client import ExecClient, ProxyClientError
from .models import ExitEvent, OutputEvent, WaitingEvent

EXIT_TIMEOUT = 124
EXIT_PROXY_FAILURE = 125


def exit_code_for(event: ExitEvent) -> int:
    """Map an exit event to a process exit code, as a shell or coreutils ``timeout`` would."""
    if event.reason in ("timeout", "idle_timeout"):
        return EXIT_TIMEOUT
    if event.exit_code is not None:
        return event.exit_code
    if event.signal is not None and event.reason == "exited":
        return 128 + event.signal
    return EXIT_PROXY_FAILURE


def _describe_end(event: ExitEvent) -> str | None:
    if event.reason == "exited":
        return None
    detail = f": {event.message}" if event.message else ""
    return f"session-proxy: command ended ({event.reason}){detail}"


async def run_exec_command(
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
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    try:
        async with (
            ExecClient(url) as client,
            client.exec(command, workdir=workdir, env=env, stdin=stdin, timeout=timeout) as events,
        ):
            async for event in events:
                if isinstance(event, OutputEvent):
                    sink = out if event.type == "stdout" else err
                    sink.write(event.payload())
                    sink.flush()
                elif isinstance(event, WaitingEvent):
                    err.write(f"session-proxy: waiting: {event.message}\n".encode())
                    err.flush()
                elif isinstance(event, ExitEvent):
                    note = _describe_end(event)
                    if note:
                        err.write(note.encode() + b"\n")
                        err.flush()
                    return exit_code_for(event)
    except ProxyClientError as error:
        err.write(f"session-proxy: {error}\n".encode())
        err.flush()
    return EXIT_PROXY_FAILURE
