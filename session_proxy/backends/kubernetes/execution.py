"""One command in the workspace: exec frames in, output chunks and an exit status out.

The exit comes from the wrapper's nonce-carrying marker, not from the end of the stream (which
a background child holding the pipes can put off for ever). A stream that ends without that
marker is explained from what is known: the exec's own status (channel 3), whether the pod is
still there, or else ``transport_lost``, never a made-up exit 0.

Whether to wait for more after the exit is decided in one place, ``output_over``: the command's
own output is complete at its exit marker (stderr) and its end-of-stdout marker (stdout); when
the exit report also says its group was empty, nothing can follow and the request ends there,
with no wait. Otherwise leftovers may still write, and their output is drained (``ExitDrain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from ...models import ExitReason, Guarantees
from ...tasks import cancel_and_wait
from ..base import DRAIN_LIMIT, DRAIN_QUIET, ExitDrain, ExitStatus, OutputChunk, StreamName, next_output
from .exec_stream import STDOUT, ExecStream
from .wrapper import LEFTOVER_GRACE, ExitReport, Marker, MarkerFilter

log = logging.getLogger(__name__)

EXIT_AFTER_KILL_TIMEOUT: Final = 5.0
WORKDIR_ERROR: Final = "workdir cannot be used in the workspace (missing, or not a directory)"
# The wrapper ended the command itself: said by a marker just before the exit status, so the
# status (143, 137) is never mistaken for the command's own. As on every early end, the exit
# code is then left out: the reason says it all.
ENDED_BY_WRAPPER: Final[dict[str, tuple[ExitReason, str]]] = {
    "deadline": ("timeout", "the workspace wrapper's backstop deadline ended the command"),
    "gone": ("transport_lost", "the exec stream's input closed, so the workspace wrapper ended the command"),
}


@dataclass(frozen=True)
class AfterExit:
    """How long a request may wait on what a command left behind: the drain of leftovers'
    output (quiet spell, limit) and the wrapper's grace before it ends them. Fixed in
    production; a test sets them absurdly long to prove that nothing waits on them when
    nothing is left."""

    drain_quiet: float = DRAIN_QUIET
    drain_limit: float = DRAIN_LIMIT
    leftover_grace: int = LEFTOVER_GRACE

    def drain(self) -> ExitDrain:
        return ExitDrain(self.drain_quiet, self.drain_limit)


def explain_exec_failure(status: ExitStatus) -> ExitStatus:
    message = status.message or ""
    if "executable file not found" in message or "no such file or directory" in message:
        hint = "the program was not found in the workspace image"
        return ExitStatus(127, reason="error", message=f"{hint}: {message}")
    return status


class KubernetesExecution:
    def __init__(
        self,
        stream: ExecStream,
        *,
        target: str,
        guarantees: Guarantees,
        nonce: str | None,
        kill_group: Callable[[int, float], Awaitable[None]],
        explain_lost_stream: Callable[[ExecStream], Awaitable[ExitStatus]],
        stdin: bytes | None,
        program: str = "",
        warm: bool = False,
        drain: ExitDrain | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.target = target
        self.warm = warm  # the header went to a pre-opened exec
        self._program = program
        self.guarantees = guarantees
        self._stream = stream
        self._filter = MarkerFilter(nonce) if nonce else None
        # The wrapper marks the end of the command's stdout on stdout (see wrapper.sh): until it
        # has arrived, stdout written before the exit may still be on its way.
        self._stdout_filter = MarkerFilter(nonce) if nonce else None
        self._stdout_complete = nonce is None
        self._kill_group = kill_group
        self._explain_lost_stream = explain_lost_stream
        self._pending: deque[OutputChunk] = deque()
        self._pgid: int | None = None
        self._exit: ExitStatus | None = None
        self._exit_reported = False  # the wrapper said the command ended (else it may still run)
        self._group_empty = False  # ... and that nothing of it was left in its group then
        self._ended_by: str | None = None  # the wrapper's reason, when it ended the command itself
        self._stream_over = False
        self._drain = drain or ExitDrain()
        self._on_end = on_end  # told once, when the request is over (the exit event is out)
        self._feeder = asyncio.create_task(self._feed(stdin), name="kube-stdin") if stdin else None

    async def _feed(self, data: bytes) -> None:
        # Sent from a task: a command that does not read its stdin must not block the start.
        await self._stream.send_stdin(data)

    # OutputSource, for next_output:
    @property
    def exited(self) -> bool:
        return self._exit is not None

    @property
    def output_complete(self) -> bool:
        return self._stdout_complete

    @property
    def stream_open(self) -> bool:
        return not self._stream_over and not self.output_over

    @property
    def output_over(self) -> bool:
        """Nothing more can come: the command's own output is all in (both end markers) and
        nothing was left in its group to write more."""
        return self._exit_reported and self._stdout_complete and self._group_empty

    def take(self) -> OutputChunk | None:
        return self._pending.popleft() if self._pending else None

    async def changed(self) -> None:
        await self._receive()

    async def next_chunk(self) -> OutputChunk | None:
        chunk = await next_output(self, self._drain)
        if chunk is None and self._exit is None:
            self._exit = await self._explain_lost_stream(self._stream)
        return chunk

    async def _receive(self) -> None:
        frame = await self._stream.receive()
        if frame is None:
            self._stream_over = True
            # Bytes kept back in case they began a marker: they were the command's.
            kept_back: tuple[tuple[StreamName, MarkerFilter | None], ...] = (
                ("stdout", self._stdout_filter),
                ("stderr", self._filter),
            )
            for name, kept in kept_back:
                held = kept.flush() if kept else b""
                if held:
                    self._pending.append(OutputChunk(name, held))
            return
        channel, payload = frame
        if channel == STDOUT:
            self._stdout(payload)
        else:
            self._stderr(payload)

    def _stdout(self, payload: bytes) -> None:
        if self._stdout_filter is None:
            self._pending.append(OutputChunk("stdout", payload))
            return
        clean, markers = self._stdout_filter.feed(payload)
        if clean:
            self._pending.append(OutputChunk("stdout", clean))
        if any(marker.kind == "end" and marker.value == "stdout" for marker in markers):
            self._stdout_complete = True

    def _stderr(self, payload: bytes) -> None:
        if self._filter is None:
            self._pending.append(OutputChunk("stderr", payload))
            return
        clean, markers = self._filter.feed(payload)
        if clean:
            self._pending.append(OutputChunk("stderr", clean))
        for marker in markers:
            self._on_marker(marker)

    def _on_marker(self, marker: Marker) -> None:
        if self._exit_reported:
            return  # the first report of the end stands
        if marker.kind == "pgid" and marker.value.isdigit():
            self._pgid = int(marker.value)
        elif marker.kind in ENDED_BY_WRAPPER:
            self._ended_by = marker.kind
        elif marker.kind == "exit" and (report := ExitReport.parse(marker.value)) is not None:
            self._exit = self._exit_of(report.status)
            self._exit_reported = True
            self._group_empty = report.group_empty
        elif marker.kind == "error":
            self._exit_reported = True
            self._stdout_complete = True  # the command never ran: no stdout to wait for
            self._group_empty = True
            self._exit = self._wrapper_error(marker.value)

    def _exit_of(self, code: int) -> ExitStatus:
        if self._ended_by is None:
            return ExitStatus(code)
        reason, message = ENDED_BY_WRAPPER[self._ended_by]
        return ExitStatus(None, reason=reason, message=message)

    def _wrapper_error(self, what: str) -> ExitStatus:
        if what == "notfound":
            # As a shell would say it: 127, the command was not found.
            message = f"program {self._program!r} was not found in the workspace image"
            return ExitStatus(127, reason="error", message=message)
        if what == "notrunnable":  # found, but exec refused it (permissions, format, E2BIG)
            message = f"program {self._program!r} could not be run in the workspace"
            return ExitStatus(126, reason="error", message=message)
        message = WORKDIR_ERROR if what == "workdir" else "the environment could not be set"
        return ExitStatus(None, reason="error", message=message)

    def exit_status(self) -> ExitStatus:
        assert self._exit is not None
        return self._exit

    async def terminate(self, grace: float) -> ExitStatus | None:
        if self._exit_reported:
            # The wrapper ends leftovers of the group itself; closing our end is its last cue.
            await self.close()
            return None
        if self._pgid is None and self._filter is not None:
            # The wrapper reports the group as it forks the command, but a request can end
            # before that report was read: read on for it, so the kill exec is not skipped.
            await self._read_until(lambda: self._pgid is not None)
        if self._pgid is not None:
            try:
                await self._kill_group(self._pgid, grace)
            except Exception:  # the dead-man switch below still ends it
                log.warning("kill exec failed; relying on the wrapper's dead-man switch", exc_info=True)
            await self._read_until(lambda: False)
        await self.close()
        return self._exit

    async def _read_until(self, done: Callable[[], bool]) -> None:
        """Read the stream until ``done``, the exit report or the stream's end (bounded); output
        read here, after the end, is not forwarded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_AFTER_KILL_TIMEOUT):
                while not done() and not self._exit_reported and not self._stream_over:
                    await self._receive()
                    self._pending.clear()

    async def close(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()
        try:
            if self._feeder is not None:
                await cancel_and_wait(self._feeder)
        finally:
            # Closing the stream is stdin EOF for the wrapper: its dead-man switch ends the group.
            await self._stream.close()
