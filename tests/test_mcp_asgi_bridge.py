"""The ASGI bridge on a real aiohttp server: what the app sends goes out when it sends it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from session_proxy.mcp.asgi_bridge import serve_asgi

pytestmark = pytest.mark.timeout(30)
Message = MutableMapping[str, Any]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Any], Awaitable[str]]]:
    """Serve an ASGI app at ``/`` of a loopback server; returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(asgi: Any) -> str:
        app = web.Application()

        async def handle(request: web.Request) -> web.StreamResponse:
            return await serve_asgi(asgi, request)

        app.router.add_route("*", "/", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}/"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_headers_go_out_before_the_first_body_chunk(serve: Callable[[Any], Awaitable[str]]) -> None:
    """A stream whose first event is far off is open (200 and headers) as soon as the app starts it."""
    headers_seen = asyncio.Event()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        await headers_seen.wait()  # the first event is sent only once the client has the headers
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": False})

    url = await serve(app)
    async with aiohttp.ClientSession() as http:
        # Without the headers the app never sends its body: a bridge that holds them back hangs here.
        response = await asyncio.wait_for(http.get(url), 20)
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        headers_seen.set()
        assert await response.read() == b"data: first\n\n"
        response.release()
