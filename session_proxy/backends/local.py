"""The embedded ``local`` backend: commands run as local subprocesses.

For development and demos. It is not a sandbox: the command runs as the proxy's user with the
proxy's filesystem. Each command gets its own session (so its own process group) and a minimal
environment; the proxy's environment, with whatever secrets it holds, is never passed on.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Final

from ..models import Guarantees
from .base import BackendInfo, ExecSpec, ExitStatus, OutputChunk, StreamName, WaitingCallback
from .process_group import terminate_group

READ_SIZE: Final = 64 * 1024
QUEUE_DEPTH: Final = 4
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# After the command exits, output still in the pipes is forwarded; a leftover child that keeps
# the pipes open must not hold the request, so draining stops after a short quiet spell.
DRAIN_QUIET: Final = 0.05
DRAIN_LIMIT: Final = 0.5
ALL_GUARANTEES: Final = Guarantees(workdir=True, env=True, stdin=True, kill=True)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name


_EOF: Final = _Marker("eof")
_EXITED: Final = _Marker("exited")
QueueItem = OutputChunk | _Marker


def status_from_returncode(returncode: int) -> ExitStatus:
    if returncode < 0:
        return ExitStatus(exit_code=None, signal=-returncode)
    return ExitStatus(exit_code=returncode)


class LocalExecution:
    """A running local command; see ``Execution`` for the contract."""

    guarantees = ALL_GUARANTEES

    def __init__(self, process: asyncio.subprocess.Process, target: str, stdin: bytes | None):
        self.target = target
        self._process = process
        self._queue: asyncio.Queue[QueueItem] = asyncio.Queue(maxsize=QUEUE_DEPTH)
        self._open_streams = 2
        self._drain_deadline: float | None = None
        assert process.stdout is not None
        assert process.stderr is not None
        self._tasks = [
            asyncio.create_task(self._pump(process.stdout, "stdout"), name="local-stdout"),
            asyncio.create_task(self._pump(process.stderr, "stderr"), name="local-stderr"),
            asyncio.create_task(self._watch_exit(), name="local-exit"),
        ]
        if stdin is not None:
            self._tasks.append(asyncio.create_task(self._feed(stdin), name="local-stdin"))

    async def _pump(self, reader: asyncio.StreamReader, stream: StreamName) -> None:
        while chunk := await reader.read(READ_SIZE):
            await self._queue.put(OutputChunk(stream, chunk))
        await self._queue.put(_EOF)

    async def _watch_exit(self) -> None:
        await self._process.wait()
        await self._queue.put(_EXITED)

    async def _feed(self, data: bytes) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command exited or closed stdin without reading it all: its choice
        finally:
            stdin.close()

    async def next_chunk(self) -> OutputChunk | None:
        loop = asyncio.get_running_loop()
        while self._open_streams:
            if self._drain_deadline is None:
                item = await self._queue.get()
            else:
                wait = min(DRAIN_QUIET, self._drain_deadline - loop.time())
                if wait <= 0:
                    break
                try:
                    async with asyncio.timeout(wait):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            if item is _EOF:
                self._open_streams -= 1
            elif item is _EXITED:
                self._drain_deadline = loop.time() + DRAIN_LIMIT
            else:
                assert isinstance(item, OutputChunk)
                return item
        await self._process.wait()  # the pipes may close before the command exits
        return None

    def exit_status(self) -> ExitStatus:
        returncode = self._process.returncode
        assert returncode is not None, "exit_status() before the command ended"
        return status_from_returncode(returncode)

    async def terminate(self, grace: float) -> ExitStatus | None:
        was_running = self._process.returncode is None
        await terminate_group(self._process.pid, grace, leader_exited=self._process.wait)
        if was_running:
            return status_from_returncode(await self._process.wait())
        return None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._process.returncode is None:  # only if terminate() was never reached
            await terminate_group(self._process.pid, 0, leader_exited=self._process.wait)
        transport = getattr(self._process, "_transport", None)
        if transport is not None:
            # Closes our ends of the pipes even if an escaped child still holds theirs.
            transport.close()


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
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.PIPE if spec.stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=self.environment(spec.env),
                start_new_session=True,
                limit=READ_SIZE,
                restore_signals=True,
            )
        except OSError as error:
            return FailedExecution(self._target, _spawn_failure(error, spec, cwd))
        return LocalExecution(process, self._target, spec.stdin)

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, ready=True, target={"root": str(self._root), "pid": os.getpid()})

    async def close(self) -> None:
        return None
