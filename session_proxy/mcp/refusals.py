"""``/mcp`` refusals in the proxy's own format, and a bound on how long a GET stream lasts.

The SDK answers its HTTP-level refusals itself: a body over the limit as a plain-text 413, a
JSON-RPC batch as a 400 carrying a validation dump, a session limit or an unknown session as
JSON-RPC errors. This ASGI wrapper sits between the bridge and the SDK and turns every answer
of 400 or more into the proxy's JSON error (``{"error": {"code", "message"}}``), counted in
``rejections_total`` and logged in one throttled line, like a refusal on ``/exec``.

A GET stream holds its session: the SDK suspends the idle expiry while any request is open.
So a GET is told its client is gone after ``stream_limit`` seconds; a client still there
opens a new one, and a session nobody uses then expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from ..errors import BodyTooLarge, MalformedRequest, NotFound, NotReady, ProxyError
from ..guards import SECURITY_HEADERS
from ..metrics import Metrics
from .asgi_bridge import AsgiApp, Message

log = logging.getLogger(__name__)
SESSION_LIMIT_RETRY_AFTER: Final = 5.0
SDK_MESSAGE_CHARS: Final = 200
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class McpRefusals:
    """The SDK's app for one ``/mcp`` request, with refusals rewritten and GET streams bounded."""

    def __init__(
        self, app: AsgiApp, *, metrics: Metrics, max_body_bytes: int, max_sessions: int, stream_limit: float
    ) -> None:
        self._app = app
        self._metrics = metrics
        self._max_body_bytes = max_body_bytes
        self._max_sessions = max_sessions
        self.stream_limit = stream_limit

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        exchange = _Exchange(self, scope, receive, send)
        await self._app(scope, exchange.receive, exchange.send)

    def refusal(self, status: int, body: bytes, *, batch: bool) -> ProxyError:
        """The proxy's error for an answer of the SDK's with this status and body."""
        said = _sdk_message(body)
        if status == 413:
            limit = self._max_body_bytes
            return BodyTooLarge(f"the MCP message is over the limit of {limit} bytes (--max-body-bytes)")
        if status == 400 and batch:
            return MalformedRequest(
                "JSON-RPC batches are not accepted on /mcp; send one message per request",
                code="batch_not_supported",
            )
        if status == 404:
            return NotFound(
                "no such MCP session (ended, expired or never opened); start a new one with initialize",
                code="mcp_session_not_found",
            )
        if status == 503:
            return NotReady(
                f"{self._max_sessions} MCP sessions are open (--mcp-max-sessions); end one "
                "(DELETE /mcp with its Mcp-Session-Id) or wait for an idle one to expire",
                retry_after=SESSION_LIMIT_RETRY_AFTER,
                code="mcp_session_limit",
            )
        if status == 400:
            return MalformedRequest(f"MCP request refused: {said}")
        return ProxyError(f"MCP request refused: {said}", code="mcp_refused", status=status)

    def answered(self, error: ProxyError, path: str) -> bytes:
        self._metrics.rejections.labels(reason=error.code).inc()
        log.info("request refused", extra={"status": error.status, "code": error.code, "path": path})
        return json.dumps({"error": error.detail()}).encode()


class _Exchange:
    """One request's receive and send, as the SDK sees them."""

    def __init__(self, refusals: McpRefusals, scope: Message, receive: Receive, send: Send) -> None:
        self._refusals = refusals
        self._scope = scope
        self._receive = receive
        self._send = send
        self._first_body = True
        self._body_done = False
        self._batch = False
        self._refused: tuple[int, list[bytes]] | None = None
        self._stream_end = asyncio.get_running_loop().time() + refusals.stream_limit

    async def receive(self) -> Message:
        if self._body_done and self._scope["method"] == "GET":
            return await self._receive_until_stream_end()
        message = await self._receive()
        if message["type"] == "http.request":
            if self._first_body:
                self._batch = message.get("body", b"").lstrip()[:1] == b"["
                self._first_body = False
            self._body_done = not message.get("more_body", False)
        return message

    async def _receive_until_stream_end(self) -> Message:
        """The client's next message, or a disconnect once the stream has lasted long enough.

        Waited for beside the caller rather than by cancelling it: the SDK runs this in an
        anyio task group, whose cancel scopes an asyncio timeout would cut across."""
        waiting = asyncio.ensure_future(self._receive())
        left = self._stream_end - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({waiting}, timeout=max(left, 0))
        if waiting in done:
            return waiting.result()
        waiting.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self._refused = (message["status"], [])
            return
        if self._refused is None:
            await self._send(message)
            return
        if message["type"] != "http.response.body":
            return
        status, parts = self._refused
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        error = self._refusals.refusal(status, b"".join(parts), batch=self._batch)
        body = self._refusals.answered(error, self._scope["path"])
        headers = [(b"content-type", b"application/json; charset=utf-8")]
        headers += [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
        headers += [(name.lower().encode(), value.encode()) for name, value in error.headers().items()]
        await self._send({"type": "http.response.start", "status": error.status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


def _sdk_message(body: bytes) -> str:
    """The message of the SDK's JSON-RPC error body (or its text), cut short."""
    try:
        said = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        said = body.decode("utf-8", "replace")
    return said[:SDK_MESSAGE_CHARS]
