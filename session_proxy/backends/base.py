"""The seam between the exec API and where commands run.

A backend starts a command and hands back an ``Execution``: a source of output chunks that ends
when the command has exited (learned out of band, never from pipe EOF), its exit status, and a
way to terminate the command with everything it started. Deadlines, limits and the wire format
live above this seam, so every backend gets them for free.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from ..models import ExitReason, Guarantees

StreamName = Literal["stdout", "stderr"]
# After the command exits, output already on its way is forwarded, but a leftover child that
# keeps the pipes open (or keeps writing) must not hold the request: draining stops after a
# short quiet spell, and after DRAIN_LIMIT in any case.
DRAIN_QUIET: Final = 0.05
DRAIN_LIMIT: Final = 0.5
# Output written before the exit but reordered behind the exit report (see ExitDrain).
OUTPUT_WAIT: Final = 1.0


class WaitingCallback(Protocol):
    """How a start tells its request that it waits (for the workspace) before anything runs."""

    async def __call__(self, message: str) -> None:
        """The start waits: say why (again at least every few seconds while it lasts). Until
        ``wait_over``, cancelling the start loses nothing: it has created nothing yet."""

    def wait_over(self) -> None:
        """The wait has ended: from here the start creates things (probes, execs, a header
        sent), so it is no longer cancelled but run to its end, and its command then ended."""


@dataclass(frozen=True)
class ExecSpec:
    exec_id: str
    argv: list[str]
    workdir: str | None
    env: dict[str, str]
    stdin: bytes | None
    timeout: float
    arrived: float  # loop time the request arrived: ``timeout`` counts from here

    @property
    def deadline(self) -> float:
        """Loop time by which the whole request, waiting and probing included, must be over."""
        return self.arrived + self.timeout


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: StreamName
    data: bytes


@dataclass(frozen=True)
class ExitStatus:
    """How a command ended on its own. ``reason`` is ``exited`` unless the backend knows worse."""

    exit_code: int | None
    signal: int | None = None
    reason: ExitReason = "exited"
    message: str | None = None


@dataclass
class BackendInfo:
    name: str
    ready: bool
    target: dict[str, Any] = field(default_factory=dict)


class Execution(Protocol):
    target: str
    guarantees: Guarantees
    warm: bool  # started on a pre-opened (warm) exec rather than a new one

    async def next_chunk(self) -> OutputChunk | None:
        """Next output chunk; ``None`` once the command has exited and its output is drained.

        Must be safe to cancel (deadlines cancel it) and must not buffer without bound: while
        nobody calls it, the command is held back.
        """

    def exit_status(self) -> ExitStatus:
        """The status, once ``next_chunk`` has returned ``None``."""

    async def terminate(self, grace: float) -> ExitStatus | None:
        """End the command and every process it started: TERM, ``grace`` seconds, KILL.

        Also called after a normal exit, to end leftovers (``sleep 300 &``). Returns the
        command's status if it was still running and ended now.
        """

    async def close(self) -> None:
        """Release pipes, sockets and tasks. Called exactly once, last."""


class ExecBackend(Protocol):
    name: str

    async def open(self) -> None:
        """Connect and load credentials at start-up; raise to stop start-up with a message."""

    async def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> Execution:
        """Start the command; raise a ``ProxyError`` if it cannot be started at all.

        ``on_waiting`` may be awaited before the command starts to report why it is delayed;
        ``on_waiting.wait_over()`` ends that phase. Until then the start may be cancelled (a
        client leaving, a shutdown) and must leave nothing behind; after it, it runs to its end.
        """

    async def info(self) -> BackendInfo:
        """What ``/status`` and ``/readyz`` report."""

    async def logs(self, tail: int) -> str:
        """The last ``tail`` lines of the workspace's own log."""

    async def close(self) -> None:
        """Release clients and connections at shutdown."""


class OutputSource(Protocol):
    """What ``next_output`` needs from a backend's running command."""

    @property
    def exited(self) -> bool:
        """The command itself has ended (learned out of band, not from pipe EOF)."""

    @property
    def output_complete(self) -> bool:
        """Everything the command wrote before it exited has arrived (where the backend can
        tell: the Kubernetes wrapper marks the end of stdout; a local pipe is read directly)."""

    @property
    def stream_open(self) -> bool:
        """More output may still arrive."""

    def take(self) -> OutputChunk | None:
        """A chunk already received, if any."""

    async def changed(self) -> None:
        """Wait for more output, end of output, or the exit."""


class ExitDrain:
    """The post-exit budget of one execution, in two phases.

    First, output the command wrote before it exited is waited for, at most ``OUTPUT_WAIT``
    from when the exit is seen (streams can be reordered on their way). Then, once it has all
    arrived, whatever leftovers still write is forwarded until a quiet spell of ``quiet`` and at
    most ``limit`` (``DRAIN_QUIET`` and ``DRAIN_LIMIT`` unless a test asks otherwise).
    """

    def __init__(self, quiet: float = DRAIN_QUIET, limit: float = DRAIN_LIMIT) -> None:
        self.quiet = quiet
        self._limit = limit
        self._exit_seen: float | None = None
        self._deadline: float | None = None

    @property
    def settled(self) -> bool:
        """The command's own output is in: only leftovers are being drained now."""
        return self._deadline is not None

    def begin(self, now: float, output_complete: bool) -> None:
        """The exit was seen: start the budget (later calls keep the first start)."""
        if self._exit_seen is None:
            self._exit_seen = now
        if self._deadline is None and (output_complete or now >= self._exit_seen + OUTPUT_WAIT):
            self._deadline = now + self._limit

    def remaining(self, now: float) -> float:
        """Seconds left of the current phase; the full budget until ``begin`` was called."""
        if self._deadline is not None:
            return self._deadline - now
        if self._exit_seen is None:
            return self._limit
        return self._exit_seen + OUTPUT_WAIT - now


async def next_output(source: OutputSource, drain: ExitDrain) -> OutputChunk | None:
    """The next chunk to forward, or None once the command has ended and draining is over."""
    loop = asyncio.get_running_loop()
    while True:
        if source.exited:
            drain.begin(loop.time(), source.output_complete)
            if drain.settled and drain.remaining(loop.time()) <= 0:
                return None
        chunk = source.take()
        if chunk is not None:
            return chunk
        if not source.stream_open:
            return None
        if not source.exited:
            await source.changed()
            continue
        wait = drain.remaining(loop.time())
        try:
            async with asyncio.timeout(min(drain.quiet, wait) if drain.settled else wait):
                await source.changed()
        except TimeoutError:
            if drain.settled:
                return None
            # else the wait for the command's own output is over: drain leftovers from here on
