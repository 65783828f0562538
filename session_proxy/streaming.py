"""One exec request, end to end: start, stream, end, finish, as one straight line.

Backpressure is structural: the next chunk is read from the backend only after the previous one
was written to the client, and ``write`` waits while the client's socket buffer is full. So a
slow client slows the command down instead of growing memory.

Whatever goes wrong, ``ExecRun.run`` ends the command (terminate, then close), answers with a
JSON error (nothing sent yet) or an ``exit`` event with reason ``error`` (streaming began), and
writes the exec's record once. On an early end the proxy chose (timeout, idle_timeout,
output_limit, shutdown, client_gone) the exit event carries ``exit_code`` and ``signal`` null
on every backend: how the command died then says nothing beyond the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, Protocol

from aiohttp import web

from .backends.base import ExecBackend, ExecSpec, Execution, ExitStatus, OutputChunk
from .deadlines import ExecDeadline
from .errors import NotReady, ProxyError
from .exec_record import ExecRecord
from .metrics import Metrics
from .models import ExitReason
from .ndjson import EventStream
from .settings import Settings
from .supervisor import Supervisor
from .transport import drain_or_abort
from .utf8 import Utf8Splitter

log = logging.getLogger(__name__)

# A client that will not read even the final event is gone; do not wait on it for ever. During
# shutdown the wait is shorter, so the drain stays within its bound.
FINAL_WRITE_TIMEOUT: Final = 10.0
FINAL_WRITE_TIMEOUT_SHUTDOWN: Final = 1.0
SHUTTING_DOWN_RETRY_AFTER: Final = 5


class Slot(Protocol):
    def release(self) -> None: ...


def shutting_down() -> NotReady:
    return NotReady(
        "the proxy is shutting down; retry against its replacement",
        retry_after=SHUTTING_DOWN_RETRY_AFTER,
        code="shutting_down",
    )


class WaitReport:
    """The ``on_waiting`` a start gets: ``waiting`` events out, and whether it only waits yet."""

    def __init__(self, events: EventStream) -> None:
        self._events = events
        self.waiting = False  # the start waits (for the workspace): nothing started, it may be cancelled

    async def __call__(self, message: str) -> None:
        self.waiting = True
        await self._events.write({"type": "waiting", "message": message})

    def wait_over(self) -> None:
        self.waiting = False


class ExecRun:
    """One ``POST /exec`` from admission to its last event; the supervisor tracks it for shutdown."""

    def __init__(
        self,
        request: web.Request,
        spec: ExecSpec,
        *,
        backend: ExecBackend,
        settings: Settings,
        metrics: Metrics,
        supervisor: Supervisor,
        slot: Slot,
    ) -> None:
        self._request = request
        self._spec = spec
        self._backend = backend
        self._settings = settings
        self._supervisor = supervisor
        self._slot = slot
        self._deadline = ExecDeadline(spec.arrived, spec.timeout, settings.idle_timeout)
        self._record = ExecRecord(spec, metrics)
        self._splitters = {"stdout": Utf8Splitter(), "stderr": Utf8Splitter()}
        self._events = EventStream(request, spec.exec_id)
        self._starting: asyncio.Task[Execution] | None = None
        self._wait = WaitReport(self._events)
        self._execution: Execution | None = None
        self._ending: asyncio.Task[ExitStatus | None] | None = None
        self._stopping = False

    @property
    def started(self) -> bool:
        """The command runs (or ran): a drain gives it the grace; before that it never starts."""
        return self._execution is not None

    def stop(self) -> None:
        """End now with reason ``shutdown``; a command not started yet is never started.

        A start still waiting (for the workspace) is cancelled; one past that point (spawning,
        connecting) runs to completion and its command is then ended at once: cancelling it
        there could lose a command that had just started.
        """
        self._stopping = True
        if self._starting is not None and self._wait.waiting:
            self._starting.cancel()
        self._deadline.stop_now()

    async def run(self) -> web.StreamResponse:
        self._supervisor.add(self)
        try:
            execution = await self._start()
            ended_by = await self._stream(execution)
            status, reason = await self._end(execution, ended_by)
            await self._finish(status, reason)
        except asyncio.CancelledError:
            # The client hung up and aiohttp cancelled the handler.
            self._record.outcome = "client_gone"
            raise
        except ConnectionError:
            # The client hung up and a write failed. Once the response has begun, return it:
            # re-raised, aiohttp would log an error-level traceback for an ordinary hang-up.
            self._record.outcome = "client_gone"
            if not self._events.begun:
                raise
        except ProxyError as error:
            if not self._events.begun:
                raise  # nothing sent yet: the middleware answers with a JSON error
            failed: ExitReason = "shutdown" if error.code == "shutting_down" else "error"
            await self._finish(ExitStatus(None, reason=failed, message=error.message), failed)
        except Exception as error:
            if not self._events.begun:
                raise  # the middleware logs it and answers with a JSON 500
            log.exception("exec failed", extra={"exec_id": self._spec.exec_id})
            message = f"internal error ({type(error).__name__}); see the proxy's log"
            await self._finish(ExitStatus(None, reason="error", message=message), "error")
        finally:
            self._over()
        return self._events.response

    async def _start(self) -> Execution:
        """Start the command, unless shutdown comes first: then it never starts."""
        if self._supervisor.draining:
            raise shutting_down()
        self._starting = asyncio.ensure_future(self._backend.start(self._spec, self._wait))
        try:
            # Shielded: a client leaving must not cancel a start half-way (see _over).
            execution = await asyncio.shield(self._starting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._stopping or (task is not None and task.cancelling()):
                raise  # the client is gone
            raise shutting_down() from None  # stop() cancelled a waiting start
        self._starting = None
        self._execution = execution
        self._record.started(execution.target, warm=execution.warm)
        # A stop that came while the command was being spawned (too late to cancel) finds it
        # started: it is then streamed like any exec and ends at once with reason shutdown, so
        # the client learns that it ran rather than a 503 saying it did not.
        return execution

    async def _stream(self, execution: Execution) -> ExitReason:
        """Forward output until the command exits or a limit ends it; return why it ended."""
        self._record.start_sent(self._deadline.elapsed())
        await self._events.write(
            {
                "type": "start",
                "exec_id": self._spec.exec_id,
                "target": execution.target,
                "timeout": self._spec.timeout,
                "guarantees": execution.guarantees.model_dump(),
                "warm": execution.warm,
            }
        )
        deadline = self._deadline
        try:
            async with deadline.running():
                while True:
                    deadline.awaiting_output()
                    chunk = await execution.next_chunk()
                    if chunk is None:
                        return "exited"
                    deadline.output_arrived()
                    if not await self._forward(chunk):
                        return "output_limit"
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours: a failure like any other
            return deadline.reason()

    async def _end(self, execution: Execution, ended_by: ExitReason) -> tuple[ExitStatus, ExitReason]:
        """Terminate what is left of the command; the status and reason the exit event reports."""
        ending = self._end_in_background()
        if ended_by == "exited":
            # Leftovers (`server &`) must not hold the exit event; they end while it is sent.
            status = execution.exit_status()
            return status, status.reason
        # Shielded: a client hanging up now must not interrupt the kill.
        await asyncio.shield(ending)
        return ExitStatus(None), ended_by  # an early end: the reason says it all (see above)

    def _over(self) -> None:
        """The request is over: end its command, write its record, leave the supervisor.

        A start still under way is waited for (cancelled first if it only waits): a command it
        starts after all is ended and accounted for then. One that finished just as the request
        ended (its result not taken yet) is ended now: left alone, it would run untracked.
        """
        starting = self._starting
        if self._execution is None and starting is not None:
            if not starting.done():
                if self._wait.waiting:
                    starting.cancel()
                starting.add_done_callback(self._adopt_late_start)
                return
            self._adopt(starting)
        self._end_in_background()
        self._record.write(self._deadline.elapsed(), answered=self._events.begun)
        self._supervisor.remove(self)

    def _adopt(self, starting: asyncio.Task[Execution]) -> None:
        """Take the execution a finished start made, if it made one, as started."""
        self._starting = None
        if starting.cancelled() or starting.exception() is not None:
            return
        self._execution = starting.result()
        self._record.started(self._execution.target, warm=self._execution.warm)

    def _adopt_late_start(self, starting: asyncio.Task[Execution]) -> None:
        self._adopt(starting)
        self._over()

    def _end_in_background(self) -> asyncio.Future[ExitStatus | None]:
        """Terminate and close the execution once, in a task that outlives the request.

        The concurrency slot is released when that is done (the group is gone), never before.
        """
        if self._ending is not None:
            return self._ending
        if self._execution is None:
            self._slot.release()  # nothing started (a start under way is left to ``_over``)
            done: asyncio.Future[ExitStatus | None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self._ending = self._supervisor.spawn(
            _terminate(self._execution, self._settings.kill_grace), f"end-{self._spec.exec_id}"
        )
        self._ending.add_done_callback(lambda _: self._slot.release())
        return self._ending

    async def _forward(self, chunk: OutputChunk) -> bool:
        """Write a chunk, cut at the output cap; False when the cap was hit."""
        record = self._record
        data = chunk.data
        room = self._settings.max_output_bytes - record.total_bytes
        if len(data) > room:
            data = data[: max(room, 0)]
            record.truncated = True
        if chunk.stream == "stdout":
            record.stdout_bytes += len(data)
        else:
            record.stderr_bytes += len(data)
        record.output_counters[chunk.stream].inc(len(data))
        for kind, text in self._splitters[chunk.stream].feed(data):
            await self._events.write({"type": chunk.stream, kind: text})
        return not record.truncated

    async def _finish(self, status: ExitStatus, reason: ExitReason) -> None:
        """Send the exit event, wait for the leftovers to be gone, end the response."""
        record = self._record
        record.status = status
        record.outcome = reason
        event = {
            "type": "exit",
            "exit_code": status.exit_code,
            "signal": status.signal,
            "reason": reason,
            "duration_ms": int(self._deadline.elapsed() * 1000),
            "stdout_bytes": record.stdout_bytes,
            "stderr_bytes": record.stderr_bytes,
            "truncated": record.truncated,
        }
        if status.message:
            event["message"] = status.message
        # Counted before the client can see the end, so a scrape right after agrees with it.
        record.write(self._deadline.elapsed(), answered=True)
        timeout = FINAL_WRITE_TIMEOUT_SHUTDOWN if self._stopping else FINAL_WRITE_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                for stream, splitter in self._splitters.items():
                    for kind, text in splitter.flush():
                        await self._events.write({"type": stream, kind: text})
                await self._events.write(event)
            await asyncio.shield(self._end_in_background())  # within the kill grace
            async with asyncio.timeout(timeout):
                await self._events.end()
        except (TimeoutError, ConnectionError):
            log.warning("client did not take the exit event", extra={"exec_id": self._spec.exec_id})
        await drain_or_abort(self._request.transport, timeout)


async def _terminate(execution: Execution, grace: float) -> ExitStatus | None:
    try:
        return await execution.terminate(grace)
    finally:
        await execution.close()
