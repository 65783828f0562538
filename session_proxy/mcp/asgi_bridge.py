"""Serve one aiohttp request with an ASGI application, streaming its answer as it is produced.

The MCP SDK's Streamable HTTP server is an ASGI app. A generic adapter that collects the
response (``aiohttp-asgi`` 0.7.1) never delivers a server-sent-event stream, so this small
bridge maps ``http.response.*`` messages straight onto an aiohttp ``StreamResponse``: the
status and headers go out with ``http.response.start`` (a client waiting on them sees its
stream open even when the first event is far off), and each body message is written (and
drained) at once, which is what carries progress live.

The request's end is told to the app twice: ``receive()`` answers ``http.disconnect`` once
the exchange is over, and ``scope["extensions"][EXCHANGE_CLOSED]`` is an ``asyncio.Event``
set at the same moment, for handlers that run outside this request's task (the SDK's
session-bound tool calls) and must stop when nobody can read their result any more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from aiohttp import web

Message = MutableMapping[str, Any]
AsgiApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
EXCHANGE_CLOSED: Final = "session_proxy.exchange_closed"
# Framing is aiohttp's job: these describe the ASGI side's connection, not ours.
HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
BODY_CHUNK: Final = 64 * 1024
WIND_DOWN: Final = 5.0
log = logging.getLogger(__name__)


def _scope(request: web.Request, closed: asyncio.Event) -> dict[str, Any]:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport else None
    sockname = transport.get_extra_info("sockname") if transport else None
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1"),
        "query_string": request.query_string.encode("latin-1"),
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        "server": tuple(sockname[:2]) if isinstance(sockname, tuple) else None,
        "state": {},
        "extensions": {EXCHANGE_CLOSED: closed},
    }


class _Exchange:
    """The receive/send pair for one request."""

    def __init__(self, request: web.Request, closed: asyncio.Event) -> None:
        self.request = request
        self.closed = closed
        self.response: web.StreamResponse | None = None
        self._body_done = False
        self._length: int | None = None

    async def receive(self) -> Message:
        if not self._body_done:
            chunk = await self.request.content.read(BODY_CHUNK)
            self._body_done = self.request.content.at_eof()
            return {"type": "http.request", "body": chunk, "more_body": not self._body_done}
        await self.closed.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.closed.is_set():
            return  # nobody is listening any more: what the app says next goes nowhere
        try:
            if message["type"] == "http.response.start":
                await self._start(message)
            elif message["type"] == "http.response.body" and self.response is not None:
                body = message.get("body", b"")
                if body:
                    await self.response.write(body)
                if not message.get("more_body", False):
                    await self.response.write_eof()
        except ConnectionError:
            self.closed.set()

    async def _start(self, message: Message) -> None:
        """Send the status and headers now: a stream's first event may be minutes away."""
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in message.get("headers", []):
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            if name.lower() == "content-length":
                self._length = int(value)
            if name.lower() not in HOP_BY_HOP:
                headers.append((name, value))
        self.response = web.StreamResponse(status=message["status"], headers=headers)
        if self._length is not None:
            self.response.content_length = self._length
        await self.response.prepare(self.request)


async def serve_asgi(app: AsgiApp, request: web.Request) -> web.StreamResponse:
    """Run ``app`` for ``request``; the answer streams out as the app sends it.

    aiohttp cancels a handler whose client hangs up, even one that already sent its whole
    answer and is only winding down. The app runs in a task of its own so that it is told
    instead (``http.disconnect``) and finishes its own way, within ``WIND_DOWN`` seconds:
    the SDK treats a cancelled opening request as a failed session.
    """
    closed = asyncio.Event()
    exchange = _Exchange(request, closed)
    call = asyncio.ensure_future(app(_scope(request, closed), exchange.receive, exchange.send))
    try:
        await asyncio.shield(call)
    except asyncio.CancelledError:
        closed.set()
        try:
            await asyncio.wait_for(call, WIND_DOWN)
        except (TimeoutError, Exception):
            log.debug("the MCP app did not wind down cleanly after a disconnect", exc_info=True)
        raise
    finally:
        closed.set()
    response = exchange.response
    if response is None:
        raise web.HTTPInternalServerError(text="the MCP application sent no response")
    if not response.prepared:
        await response.prepare(request)
        await response.write_eof()
    return response
