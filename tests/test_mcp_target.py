"""The MCP tools' target: status and logs share one connection, and a broken answer is a
proxy client error the tools can report, never a raw HTTP library exception."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from session_proxy.client import ProxyClientError
from session_proxy.mcp.target import ExecApiTarget

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def status_server() -> AsyncIterator[tuple[str, list[object]]]:
    """A tiny exec API: /status answers; /logs hangs up half-way. Each request's peer is noted."""
    peers: list[object] = []

    async def status(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"backend": "fake"})

    async def broken_logs(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_get("/logs", broken_logs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", peers
    await runner.cleanup()


async def test_status_calls_share_one_connection(status_server: tuple[str, list[object]]) -> None:
    """Repeated status calls reuse one kept-alive connection (one HTTP session per target)."""
    url, peers = status_server
    target = ExecApiTarget(url, token=None)
    try:
        for _ in range(3):
            assert await target.status() == {"backend": "fake"}
    finally:
        await target.close()
    assert len(peers) == 3
    assert len(set(peers)) == 1, peers


async def test_a_broken_answer_is_a_proxy_client_error(status_server: tuple[str, list[object]]) -> None:
    """An answer cut off half-way raises ProxyClientError (the tools turn it into a tool error)."""
    url, _ = status_server
    target = ExecApiTarget(url, token=None)
    try:
        with pytest.raises(ProxyClientError):
            await asyncio.wait_for(target.logs(10), 20)
    finally:
        await target.close()
