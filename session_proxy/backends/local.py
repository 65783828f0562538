"""The embedded ``local`` backend: commands run as local subprocesses.

For development and demos. It is not a sandbox: the command runs as the proxy's user with the
proxy's filesystem. Each command gets its own session (so its own process group) and a minimal
environment; the proxy's environment, with whatever secrets it holds, is never passed on.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections import deque
from pathlib import Path
from typing import Final

from ..errors import NotFound
from ..models import Guarantees
from .base import (
    BackendInfo,
    ExecSpec,
    ExitDrain,
    ExitStatus,
    OutputChunk,
    StreamName,
    WaitingCallback,
    next_output,
)
from .process_group import terminate_group

# Output waiting for the client is capped: past HIGH_WATER the pipes are no longer read, so the
# command blocks in write() until the client catches up (backpressure, bounded memory).
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ALL_GUARANTEES: Final = Guarantees(workdir=True, env=True, stdin=True, kill=True)
STREAMS: Final[dict[int, StreamName]] = {1: "stdout", 2: "stderr"}


def status_from_returncode(returncode: int) -> ExitStatus:
    if returncode < 0:
        return ExitStatus(exit_code=None, signal=-returncode)
    return ExitStatus(exit_code=returncode)


class CommandProtocol(asyncio.SubprocessProtocol):
    """Collects output with flow control and learns of the exit apart from pipe EOF.

    asyncio's ``Process.wait()`` returns only once the pipes have closed, which a background
    child holding them (``server &``) can put off for ever; ``process_exited`` cannot.
    """

    def __init__(self) -> None:
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited = False
        self.chunks: deque[OutputChunk] = deque()
        self.open_streams = set(STREAMS)
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        self.chunks.append(OutputChunk(STREAMS[fd], data))
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER and not self._paused:
            self._set_reading(False)
        self._wake()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.open_streams.discard(fd)
        self._wake()

    def process_exited(self) -> None:
        self.exited = True
        self._wake()

    @property
    def stream_open(self) -> bool:
        return bool(self.open_streams)

    def take(self) -> OutputChunk | None:
        if not self.chunks:
            return None
        chunk = self.chunks.popleft()
        self._buffered -= len(chunk.data)
        if self._paused and self._buffered <= LOW_WATER:
            self._set_reading(True)
        return chunk

    async def changed(self) -> None:
        """Wait until output, EOF or the exit arrives."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _set_reading(self, reading: bool) -> None:
        assert self.transport is not None
        self._paused = not reading
        for fd in self.open_streams:
            pipe = self.transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                pipe.resume_reading() if reading else pipe.pause_reading()


class LocalExecution:
    """A running local command; see ``Execution`` for the contract."""

    guarantees = ALL_GUARANTEES

    def __init__(self, transport: asyncio.SubprocessTransport, protocol: CommandProtocol, target: str):
        self.target = target
        self._transport = transport
        self._protocol = protocol
        self._pid = transport.get_pid()
        self._drain = ExitDrain()

    async def next_chunk(self) -> OutputChunk | None:
        chunk = await next_output(self._protocol, self._drain)
        if chunk is None:
            await self._exited()  # the pipes may close before the command exits
        return chunk

    async def _exited(self) -> int:
        while not self._protocol.exited:
            await self._protocol.changed()
        returncode = self._transport.get_returncode()
        assert returncode is not None
        return returncode

    def exit_status(self) -> ExitStatus:
        returncode = self._transport.get_returncode()
        assert returncode is not None, "exit_status() before the command ended"
        return status_from_returncode(returncode)

    async def terminate(self, grace: float) -> ExitStatus | None:
        was_running = not self._protocol.exited
        await terminate_group(self._pid, grace, leader_exited=self._exited)
        if was_running and self._protocol.exited:
            return self.exit_status()
        return None

    async def close(self) -> None:
        # Closes our ends of the pipes even if an escaped child still holds theirs.
        self._transport.close()


class FailedExecution:
    """A command that could not be started: no output, then an ``error`` exit."""

    guarantees = ALL_GUARANTEES

    def __init__(self, target: str, status: ExitStatus) -> None:
        self.target = target
        self._status = status

    async def next_chunk(self) -> OutputChunk | None:
        return None

    def exit_status(self) -> ExitStatus:
        return self._status

    async def terminate(self, grace: float) -> ExitStatus | None:
        return None

    async def close(self) -> None:
        return None


def _spawn_failure(error: OSError, spec: ExecSpec, cwd: str) -> ExitStatus:
    # Shell conventions: 127 for "not found", 126 for "found but cannot run".
    if error.filename == cwd and spec.argv[0] != cwd:
        return ExitStatus(
            exit_code=None,
            reason="error",
            message=f"workdir {cwd!r} cannot be used: {error.strerror}",
        )
    exit_code = 127 if isinstance(error, FileNotFoundError) else 126
    return ExitStatus(
        exit_code=exit_code,
        reason="error",
        message=f"cannot run {spec.argv[0]!r}: {error.strerror}",
    )


def _feed_stdin(transport: asyncio.SubprocessTransport, data: bytes) -> None:
    """Queue the whole input and close the pipe after it (EOF), without blocking anyone.

    The input is bounded by the request body limit. A command that exits without reading it
    just breaks the pipe, which the pipe transport absorbs quietly.
    """
    stdin = transport.get_pipe_transport(0)
    assert isinstance(stdin, asyncio.WriteTransport)
    stdin.write(data)
    stdin.write_eof()


class LocalBackend:
    """Runs commands on this machine, in ``root`` unless a request names a workdir."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self._root = root
        self._target = f"local:{root}"

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        base = {"PATH": DEFAULT_PATH, "HOME": str(self._root), "LANG": "C.UTF-8"}
        return {**base, **extra}

    async def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> LocalExecution | FailedExecution:
        cwd = spec.workdir or str(self._root)
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                CommandProtocol,
                *spec.argv,
                stdin=subprocess.PIPE if spec.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=self.environment(spec.env),
                start_new_session=True,
            )
        except OSError as error:
            return FailedExecution(self._target, _spawn_failure(error, spec, cwd))
        if spec.stdin is not None:
            _feed_stdin(transport, spec.stdin)
        return LocalExecution(transport, protocol, self._target)

    async def open(self) -> None:
        return None

    async def logs(self, tail: int) -> str:
        raise NotFound("the local backend has no workspace log; /logs is for the kubernetes backend")

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, ready=True, target={"root": str(self._root), "pid": os.getpid()})

    async def close(self) -> None:
        return None
