"""One exec, end to end: backend output to NDJSON events, under deadlines and caps.

Backpressure is structural: the next chunk is read from the backend only after the previous one
was written to the client, and ``write`` waits while the client's socket buffer is full. So a
slow client slows the command down instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

from .backends.base import ExecBackend, ExecSpec, Execution, ExitStatus, OutputChunk
from .errors import ProxyError
from .logs import argv_digest
from .metrics import Metrics
from .models import ExitReason
from .settings import Settings
from .supervisor import Supervisor
from .utf8 import Utf8Splitter

log = logging.getLogger(__name__)

# A client that will not read even the final event is gone; do not wait on it for ever.
FINAL_WRITE_TIMEOUT: Final = 10.0


def encode_event(event: dict[str, Any]) -> bytes:
    # orjson writes the same bytes as json.dumps(ensure_ascii=False, separators=(",", ":")),
    # about thirty times faster on large strings: escaping output is the streaming hot path.
    return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)


@dataclass
class ExecTally:
    """What the exec log line and the exit event report."""

    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    outcome: str = "error"
    status: ExitStatus | None = None
    splitters: dict[str, Utf8Splitter] = field(
        default_factory=lambda: {"stdout": Utf8Splitter(), "stderr": Utf8Splitter()}
    )

    @property
    def total(self) -> int:
        return self.stdout_bytes + self.stderr_bytes


class ExecSession:
    def __init__(
        self,
        request: web.Request,
        spec: ExecSpec,
        *,
        backend: ExecBackend,
        settings: Settings,
        metrics: Metrics,
        supervisor: Supervisor,
    ) -> None:
        self._request = request
        self._spec = spec
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self._supervisor = supervisor
        self._response: web.StreamResponse | None = None
        self._timer: asyncio.Timeout | None = None
        self._stop_reason: ExitReason | None = None
        self._tally = ExecTally()
        self._target = ""
        self._recorded = False
        self._output_counters = {
            stream: metrics.output_bytes.labels(stream=stream) for stream in ("stdout", "stderr")
        }
        self._loop = asyncio.get_running_loop()
        self._started = spec.arrived  # the timeout counts from the request's arrival

    def stop(self, reason: str) -> None:
        """Ask the exec to end now (server shutdown); the command is then terminated."""
        assert reason == "shutdown"
        self._stop_reason = "shutdown"
        if self._timer is not None and not self._timer.expired():
            self._timer.reschedule(self._loop.time())

    async def run(self) -> web.StreamResponse:
        try:
            execution = await self._backend.start(self._spec, self._send_waiting)
        except ProxyError as error:
            if self._response is None:
                raise  # nothing sent yet: a plain JSON error response
            await self._finish(ExitStatus(None, reason="error", message=error.message), "error")
            return self._response
        self._target = execution.target
        self._supervisor.add(self)
        self._metrics.in_flight.inc()
        try:
            return await self._stream(execution)
        finally:
            self._supervisor.remove(self)
            self._record()

    async def _stream(self, execution: Execution) -> web.StreamResponse:
        try:
            response = await self._prepare()
            # Every exec opens its own stream today; warm (pre-opened) execs will say "warm".
            self._metrics.exec_start_latency.labels(path="cold").observe(self._loop.time() - self._started)
            await response.write(encode_event(self._start_event(execution)))
            reason = await self._pump(execution)
        except (asyncio.CancelledError, ConnectionError):
            # The client hung up (aiohttp cancels the handler, or a write fails).
            self._tally.outcome = "client_gone"
            self._end(execution)
            raise
        if reason == "exited":
            status = execution.exit_status()
            # Leftovers (`server &`) must not hold the request; end them after it is answered.
            self._end(execution)
        else:
            # Shielded: a client hanging up now must not interrupt the kill.
            ended: ExitStatus | None = await asyncio.shield(self._end(execution))
            status = ended or ExitStatus(None)
        await self._finish(status, status.reason if reason == "exited" else reason)
        return response

    def _end(self, execution: Execution) -> asyncio.Task[ExitStatus | None]:
        """Terminate what is left of the command, as a task that runs to completion."""
        return self._supervisor.spawn(self._terminate(execution), f"end-{self._spec.exec_id}")

    async def _terminate(self, execution: Execution) -> ExitStatus | None:
        try:
            return await execution.terminate(self._settings.kill_grace)
        finally:
            await execution.close()

    async def _pump(self, execution: Execution) -> ExitReason:
        deadline = self._started + self._spec.timeout
        idle = self._settings.idle_timeout
        try:
            # One timer for the whole exec, moved between the idle and the wall-clock deadline:
            # waiting for output may be cut by either, writing to a slow client by the latter.
            async with asyncio.timeout_at(deadline) as self._timer:
                while self._stop_reason is None:
                    if idle:
                        self._timer.reschedule(min(deadline, self._loop.time() + idle))
                    chunk = await execution.next_chunk()
                    if chunk is None:
                        return "exited"
                    if idle:
                        self._timer.reschedule(deadline)
                    if not await self._forward(chunk):
                        return "output_limit"
        except TimeoutError:
            pass
        finally:
            self._timer = None
        return self._early_reason(deadline)

    def _early_reason(self, deadline: float) -> ExitReason:
        if self._stop_reason is not None:
            return self._stop_reason
        return "timeout" if self._loop.time() >= deadline else "idle_timeout"

    async def _forward(self, chunk: OutputChunk) -> bool:
        """Write a chunk, cut at the output cap; False when the cap was hit."""
        tally = self._tally
        data = chunk.data
        room = self._settings.max_output_bytes - tally.total
        if len(data) > room:
            data = data[: max(room, 0)]
            tally.truncated = True
        if chunk.stream == "stdout":
            tally.stdout_bytes += len(data)
        else:
            tally.stderr_bytes += len(data)
        self._output_counters[chunk.stream].inc(len(data))
        for kind, text in tally.splitters[chunk.stream].feed(data):
            await self._write({"type": chunk.stream, kind: text})
        return not tally.truncated

    async def _finish(self, status: ExitStatus, reason: ExitReason) -> None:
        tally = self._tally
        tally.status = status
        tally.outcome = reason
        event = {
            "type": "exit",
            "exit_code": status.exit_code,
            "signal": status.signal,
            "reason": reason,
            "duration_ms": int((self._loop.time() - self._started) * 1000),
            "stdout_bytes": tally.stdout_bytes,
            "stderr_bytes": tally.stderr_bytes,
            "truncated": tally.truncated,
        }
        if status.message:
            event["message"] = status.message
        # Counted before the client can see the end, so a scrape right after agrees with it.
        self._record()
        try:
            async with asyncio.timeout(FINAL_WRITE_TIMEOUT):
                for stream, splitter in tally.splitters.items():
                    for kind, text in splitter.flush():
                        await self._write({"type": stream, kind: text})
                await self._write(event)
                response = await self._prepare()
                await response.write_eof()
        except (TimeoutError, ConnectionError):
            log.warning("client did not take the exit event", extra={"exec_id": self._spec.exec_id})

    async def _send_waiting(self, message: str) -> None:
        await self._write({"type": "waiting", "message": message})

    async def _write(self, event: dict[str, Any]) -> None:
        response = await self._prepare()
        await response.write(encode_event(event))

    async def _prepare(self) -> web.StreamResponse:
        if self._response is None:
            response = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": "application/x-ndjson",
                    "Cache-Control": "no-store",
                    "X-Exec-Id": self._spec.exec_id,
                },
            )
            response.enable_chunked_encoding()
            await response.prepare(self._request)
            self._response = response
        return self._response

    def _start_event(self, execution: Execution) -> dict[str, Any]:
        return {
            "type": "start",
            "exec_id": self._spec.exec_id,
            "target": execution.target,
            "timeout": self._spec.timeout,
            "guarantees": execution.guarantees.model_dump(),
        }

    def _record(self) -> None:
        """Metrics and the one log line per exec; runs once, whichever way the exec ends."""
        if self._recorded:
            return
        self._recorded = True
        if self._target:
            self._metrics.in_flight.dec()
        tally = self._tally
        duration = self._loop.time() - self._started
        self._metrics.exec_requests.labels(outcome=tally.outcome).inc()
        self._metrics.exec_duration.observe(duration)
        status = tally.status
        extra: dict[str, Any] = {
            "exec_id": self._spec.exec_id,
            "target": self._target,
            "argv_sha256": argv_digest(self._spec.argv),
            "duration_ms": int(duration * 1000),
            "exit_code": status.exit_code if status else None,
            "signal": status.signal if status else None,
            "stdout_bytes": tally.stdout_bytes,
            "stderr_bytes": tally.stderr_bytes,
            "truncated": tally.truncated,
            "outcome": tally.outcome,
        }
        if log.isEnabledFor(logging.DEBUG):
            extra["argv"] = self._spec.argv
        log.info("exec finished", extra=extra)
