"""The embedded ``local`` backend: commands run as local subprocesses.

For development and demos. It is not a sandbox: the command runs as the proxy's user with the
proxy's filesystem. Each command gets its own session (so its own process group) and a minimal
environment; the proxy's environment, with whatever secrets it holds, is never passed on.

Commands are started by a helper process (``spawner``), each under its own leader that answers
for everything the command starts, including processes that leave its group or session, and
ends all of it when the proxy goes away, even by SIGKILL. Linux only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Final, TypeVar

from ..errors import BackendFailure, NotFound, NotReady, ProxyError
from ..metrics import Metrics
from ..models import Guarantees
from ..tasks import cancel_and_wait
from .base import BackendInfo, ExecSpec, ExitDrain, ExitStatus, OutputChunk, WaitingCallback, next_output
from .local_output import CommandOutput
from .local_spawner import CommandPipes, LeaderChannel, Spawner

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ALL_GUARANTEES: Final = Guarantees(workdir=True, env=True, stdin=True, kill=True, runner="local")
# The leader answers a terminate within grace + its own KILL confirmation (2 s); past this
# margin it is presumed stuck (stopped, say) and the proxy ends the group itself.
LEADER_REPLY_MARGIN: Final = 10.0
START_REPLY_TIMEOUT: Final = 30.0  # the spawner forks a leader, the leader a command: normally ms
SPAWNER_CHECK: Final = 0.5  # how often a start waiting on the spawner checks it is not stopped
START_ATTEMPTS: Final = 3  # starts on a new spawner after one that failed before anything ran
# A start may take this long even past a shorter request timeout: a working spawner starts a
# command in milliseconds, and the command is then ended by its timeout like any other. Only a
# spawner slower than that (stopped, starved) turns the request into a 503 that nothing ran.
START_FLOOR: Final = 0.25
DESCRIPTORS_RETRY_AFTER: Final = 1.0
LEADER_GONE: Final = "the command's leader process ended unexpectedly; its exit status is unknown"

T = TypeVar("T")
log = logging.getLogger(__name__)


def status_from_returncode(returncode: int) -> ExitStatus:
    if returncode < 0:
        return ExitStatus(exit_code=None, signal=-returncode)
    return ExitStatus(exit_code=returncode)


class LocalExecution:
    """A running local command; see ``Execution`` for the contract."""

    guarantees = ALL_GUARANTEES
    warm = False

    def __init__(
        self, target: str, exec_id: str, pid: int, channel: LeaderChannel, output: CommandOutput,
        stdin: StdinFeed | None, metrics: Metrics | None,
    ) -> None:  # fmt: skip
        self.target = target
        self._exec_id = exec_id
        self._pid = pid
        self._channel = channel
        self._output = output
        self._metrics = metrics
        self._drain = ExitDrain()
        self._returncode: int | None = None
        self._leader_gone = False
        self._survivors: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._stdin = stdin
        self._follower = asyncio.create_task(self._follow(), name=f"leader-{exec_id}")

    async def _follow(self) -> None:
        """Apply the leader's reports: the command's exit, then what survived the end."""
        while (message := await self._channel.receive()) is not None:
            if "exited" in message:
                self._returncode = int(message["exited"])
                self._output.mark_exited()
            elif "terminated" in message and not self._survivors.done():
                self._survivors.set_result([int(pid) for pid in message["terminated"]])
        self._leader_gone = True
        self._output.mark_exited()
        if not self._survivors.done():
            self._survivors.cancel()

    async def next_chunk(self) -> OutputChunk | None:
        chunk = await next_output(self._output, self._drain)
        if chunk is None:
            while not self._output.exited:  # the pipes may close before the command exits
                await self._output.changed()
        return chunk

    def exit_status(self) -> ExitStatus:
        if self._returncode is None:
            assert self._leader_gone, "exit_status() before the command ended"
            return ExitStatus(exit_code=None, reason="error", message=LEADER_GONE)
        return status_from_returncode(self._returncode)

    async def terminate(self, grace: float) -> ExitStatus | None:
        was_running = not self._output.exited
        # After a normal exit, a process detached on purpose (own session, no pipe of ours) may
        # stay; on an early end, nothing the command started does.
        self._channel.send({"terminate": grace, "spare_detached": not was_running})
        try:
            async with asyncio.timeout(grace + LEADER_REPLY_MARGIN):
                survivors = await asyncio.shield(self._survivors)
        except TimeoutError:
            survivors = self._kill_group()  # the leader is stuck (stopped, say)
        except asyncio.CancelledError:
            if not self._survivors.cancelled():
                raise  # this task is being cancelled, not the leader gone
            survivors = self._kill_group()
        self._report(survivors)
        if was_running and self._output.exited:
            return self.exit_status()
        return None

    def _kill_group(self) -> list[int]:
        """Without a leader, the proxy can still KILL the command's own group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, signal.SIGKILL)
        return []

    def _report(self, survivors: list[int]) -> None:
        if not survivors:
            return
        extra = {"exec_id": self._exec_id, "pids": survivors}
        log.warning("processes survived KILL", extra=extra)
        if self._metrics is not None:
            self._metrics.processes_survived_kill.inc(len(survivors))

    async def close(self) -> None:
        # EOF on the channel tells a leader still running to KILL everything below it.
        await self._channel.close()
        self._output.close()
        if self._stdin is not None:
            self._stdin.abort()
        await cancel_and_wait(self._follower)


class FailedExecution:
    """A command that could not be started: no output, then an ``error`` exit."""

    guarantees = ALL_GUARANTEES
    warm = False

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


class NothingRan(Exception):
    """The spawner failed before any leader took the request: starting again is safe."""


def refusal_for(error: OSError) -> ProxyError:
    """Out of descriptors (or memory) is a passing condition: a 503 to retry; else a 502."""
    if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return NotReady(
            f"the proxy cannot open the command's pipes now ({error.strerror}); retry shortly, "
            "or raise the proxy's descriptor limit (ulimit -n)",
            retry_after=DESCRIPTORS_RETRY_AFTER,
            code="out_of_descriptors",
        )
    return BackendFailure(f"the local process spawner failed: {error.strerror}")


def start_too_late() -> NotReady:
    return NotReady(
        "the local process spawner did not start the command within the request's timeout "
        "(nothing ran); retry",
        retry_after=1,
        code="spawner_unavailable",
    )


def spawn_failure(report: dict[str, Any], spec: ExecSpec, cwd: str) -> ExitStatus:
    """The leader's ``failed`` report as an exit: shell conventions, 127 not found, 126 not runnable."""
    reason = os.strerror(int(report["errno"]))
    if report["failed"] == "chdir":
        return ExitStatus(exit_code=None, reason="error", message=f"workdir {cwd!r} cannot be used: {reason}")
    exit_code = 127 if report["errno"] in (2, 20) else 126  # ENOENT, ENOTDIR
    return ExitStatus(exit_code=exit_code, reason="error", message=f"cannot run {spec.argv[0]!r}: {reason}")


class LocalBackend:
    """Runs commands on this machine, in ``root`` unless a request names a workdir."""

    name = "local"

    def __init__(self, root: Path, metrics: Metrics | None = None) -> None:
        self._root = root
        self._target = f"local:{root}"
        self._metrics = metrics
        self._spawner: Spawner | None = None
        self._spawner_lock = asyncio.Lock()

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        base = {"PATH": DEFAULT_PATH, "HOME": str(self._root), "LANG": "C.UTF-8"}
        return {**base, **extra}

    async def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> LocalExecution | FailedExecution:
        """Start the command; a spawner that ended or got stuck before any leader took the
        request (so nothing ran) is replaced and the start tried again."""
        cwd = spec.workdir or str(self._root)
        start_by = max(spec.deadline, asyncio.get_running_loop().time() + START_FLOOR)
        attempts = 0
        while True:
            spawner = await self._running_spawner()
            try:
                return await self._start_once(spawner, spec, cwd, start_by)
            except NothingRan as failure:
                log.warning("the local process spawner failed before the command started (%s)", failure)
                await self._replace_spawner(spawner)
                attempts += 1
                if attempts == START_ATTEMPTS:
                    raise BackendFailure(f"the local process spawner failed {attempts} times") from failure

    async def _start_once(
        self, spawner: Spawner, spec: ExecSpec, cwd: str, start_by: float
    ) -> LocalExecution | FailedExecution:
        try:
            pipes = CommandPipes(with_stdin=spec.stdin is not None)
        except OSError as error:
            raise refusal_for(error) from error
        try:
            try:
                await self._watched(spawner, spawner.request(pipes.for_leader), start_by)
            finally:
                pipes.close_leader_ends()
            channel = await LeaderChannel.connect(pipes.control)
        except OSError as error:
            pipes.close_ours()
            if not spawner.alive():
                raise NothingRan(f"it ended: {error.strerror}") from error
            raise BackendFailure(f"the local process spawner failed: {error.strerror}") from error
        except BaseException:
            pipes.close_ours()
            raise
        # start_by: a leader that reads this too late (its spawner stuck meanwhile) starts nothing.
        env = self.environment(spec.env)
        channel.send({"argv": spec.argv, "cwd": cwd, "env": env, "start_by": start_by})
        try:
            report = await self._watched(spawner, channel.receive(), start_by)
            if report is None or "started" not in report:
                pipes.close_ours(control=False)
                await channel.close()
                return self._not_started(report, spawner, spec, cwd)
            output = CommandOutput()
            await output.connect(pipes.take_stdout(), pipes.take_stderr())
            stdin = await StdinFeed.feed(pipes.take_stdin(), spec.stdin) if spec.stdin is not None else None
        except BaseException:
            pipes.close_ours(control=False)
            await channel.close()
            raise
        pid = int(report["started"])
        return LocalExecution(self._target, spec.exec_id, pid, channel, output, stdin, self._metrics)

    def _not_started(
        self, report: dict[str, Any] | None, spawner: Spawner, spec: ExecSpec, cwd: str
    ) -> FailedExecution:
        """The leader's refusal as an exit, or the error for a leader that never answered."""
        if report is None:
            if not spawner.alive():
                raise NothingRan("it ended before forking the command's leader")
            raise BackendFailure("the local process spawner did not start the command")
        if report["failed"] == "deadline":
            raise start_too_late()
        return FailedExecution(self._target, spawn_failure(report, spec, cwd))

    async def _watched(self, spawner: Spawner, step: Awaitable[T], start_by: float) -> T:
        """One step of a start that waits on the spawner, bounded by ``start_by`` (the request's
        deadline, or ``START_FLOOR`` after its start when that is later).

        A spawner found stopped meanwhile is killed: requests queued on its socket die with it,
        so their leaders never start and the step ends with EOF (nothing ran, start again).
        """
        loop = asyncio.get_running_loop()
        give_up = min(start_by, loop.time() + START_REPLY_TIMEOUT)
        task = asyncio.ensure_future(step)
        try:
            while not task.done():
                left = give_up - loop.time()
                if left <= 0:
                    if spawner.stopped() or left + START_REPLY_TIMEOUT <= 0:
                        spawner.kill()
                    if loop.time() >= start_by:
                        raise start_too_late()
                    raise BackendFailure("the local process spawner did not answer")
                await asyncio.wait({task}, timeout=min(SPAWNER_CHECK, left))
                if not task.done() and spawner.stopped():
                    log.warning("the local process spawner is stopped; ending it", extra={"pid": spawner.pid})
                    spawner.kill()
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _running_spawner(self) -> Spawner:
        async with self._spawner_lock:
            if self._spawner is not None and not self._spawner.alive():
                log.warning("the local process spawner ended; starting a new one")
                await self._spawner.close()
                self._spawner = None
            if self._spawner is None:
                try:
                    self._spawner = await Spawner.start()
                except OSError as error:
                    raise refusal_for(error) from error
            return self._spawner

    async def _replace_spawner(self, spawner: Spawner) -> None:
        """End a spawner that failed a start (once, however many starts it failed)."""
        async with self._spawner_lock:
            if self._spawner is spawner:
                self._spawner = None
                spawner.kill()
                await spawner.close()

    async def open(self) -> None:
        await self._running_spawner()

    async def logs(self, tail: int) -> str:
        raise NotFound("the local backend has no workspace log; /logs is for the kubernetes backend")

    async def info(self) -> BackendInfo:
        return BackendInfo(name=self.name, ready=True, target={"root": str(self._root), "pid": os.getpid()})

    async def close(self) -> None:
        if self._spawner is not None:
            await self._spawner.close()
            self._spawner = None


class StdinFeed(asyncio.Protocol):
    """The command's stdin pipe: the whole input is queued, then EOF, without blocking anyone.

    The input is bounded by the request body limit. A command that exits without reading it
    just breaks the pipe, which the pipe transport absorbs quietly.
    """

    def __init__(self) -> None:
        self._transport: asyncio.WriteTransport | None = None
        self._lost = False

    @classmethod
    async def feed(cls, fd: int, data: bytes) -> StdinFeed:
        pipe = os.fdopen(fd, "wb", buffering=0)
        transport, feed = await asyncio.get_running_loop().connect_write_pipe(cls, pipe)
        transport.write(data)
        transport.write_eof()
        return feed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True

    def abort(self) -> None:
        """Close the pipe now and drop unread input: closing would wait for a reader to drain
        it, holding the pipe and the buffer for as long as something keeps the other end."""
        if self._transport is not None and not self._lost:
            self._transport.abort()
