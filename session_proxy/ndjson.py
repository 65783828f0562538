"""An exec's answer: NDJSON events on a chunked HTTP response that begins with the first event.

Until then nothing is sent, so a failure can still be a plain JSON error with its own status.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def encode_event(event: dict[str, Any]) -> bytes:
    # orjson writes the same bytes as json.dumps(ensure_ascii=False, separators=(",", ":")),
    # about thirty times faster on large strings: escaping output is the streaming hot path.
    return orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)


class EventStream:
    """The events of one exec, written in order; ``write`` waits while the client is behind."""

    def __init__(self, request: web.Request, exec_id: str) -> None:
        self._request = request
        self._exec_id = exec_id
        self._response: web.StreamResponse | None = None

    @property
    def begun(self) -> bool:
        """The 200 answer has been sent: failures from now on travel as events."""
        return self._response is not None

    @property
    def response(self) -> web.StreamResponse:
        assert self._response is not None, "no event was sent"
        return self._response

    async def write(self, event: dict[str, Any]) -> None:
        response = self._response or await self._begin()
        await response.write(encode_event(event))

    async def end(self) -> None:
        response = self._response or await self._begin()
        await response.write_eof()

    async def _begin(self) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "application/x-ndjson",
                "Cache-Control": "no-store",
                "X-Exec-Id": self._exec_id,
            },
        )
        response.enable_chunked_encoding()
        # Begun as soon as the headers are on their way: if writing them fails, the client is
        # gone, and no JSON error could follow them anyway (a hang-up, not a failure to report).
        self._response = response
        await response.prepare(self._request)
        return response
