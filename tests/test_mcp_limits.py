"""/mcp under abuse: refusals in the proxy's JSON format and counted, sessions capped and
expiring, a GET stream that cannot hold its session for ever, session ids kept out of info logs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .conftest import ProxyFactory, RunningProxy
from .test_mcp_http import INITIALIZE, MCP_HEADERS, PROTOCOL, metric, metrics_text

pytestmark = pytest.mark.timeout(60)
REFUSALS = 40


async def refusal(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The proxy's JSON error of a refused request."""
    assert response.content_type == "application/json", await response.text()
    error: dict[str, str] = (await response.json())["error"]
    return error


async def open_session(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    """Initialize a session (and say so, as clients do); its id."""
    async with http.post(f"{proxy.url}/mcp", json=INITIALIZE, headers=MCP_HEADERS) as response:
        assert response.status == 200, await response.text()
        session = response.headers["Mcp-Session-Id"]
        await response.read()
    headers = {**MCP_HEADERS, "Mcp-Session-Id": session, "Mcp-Protocol-Version": PROTOCOL}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(f"{proxy.url}/mcp", json=initialized, headers=headers) as response:
        assert response.status == 202, await response.text()
    return session


async def test_a_batch_is_a_json_400_and_counted(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A JSON-RPC batch gets the documented JSON error (not a validation dump), counted."""
    async with http.post(f"{proxy.url}/mcp", json=[INITIALIZE, INITIALIZE], headers=MCP_HEADERS) as response:
        assert response.status == 400
        error = await refusal(response)
    assert error["code"] == "batch_not_supported"
    assert "pydantic" not in error["message"]
    metrics = await metrics_text(http, proxy)
    assert metric(metrics, "session_proxy_rejections_total", 'reason="batch_not_supported"') == 1


async def test_a_body_over_the_limit_is_a_json_413_and_counted(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """Over --max-body-bytes, with a length or chunked, /mcp answers 413 body_too_large in JSON."""
    proxy = await make_proxy(max_body_bytes=4096)
    big = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "' + b"x" * 8192 + b'"}}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1024):
            yield big[start : start + 1024]

    for data in (big, chunked()):
        async with http.post(f"{proxy.url}/mcp", data=data, headers=MCP_HEADERS) as response:
            assert response.status == 413
            assert (await refusal(response))["code"] == "body_too_large"
    metrics = await metrics_text(http, proxy)
    assert metric(metrics, "session_proxy_rejections_total", 'reason="body_too_large"') == 2


async def test_sessions_are_capped_refusals_counted_and_logged_throttled(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Past --mcp-max-sessions a new session gets a JSON 503 with Retry-After, every refusal is
    counted, the log lines about them are throttled, and no session id is logged at info."""
    proxy = await make_proxy(mcp_max_sessions=2)
    with caplog.at_level(logging.INFO):
        sessions = [await open_session(http, proxy), await open_session(http, proxy)]
        for _ in range(REFUSALS):
            async with http.post(f"{proxy.url}/mcp", json=INITIALIZE, headers=MCP_HEADERS) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "5"
                assert (await refusal(response))["code"] == "mcp_session_limit"
    metrics = await metrics_text(http, proxy)
    assert metric(metrics, "session_proxy_rejections_total", 'reason="mcp_session_limit"') == REFUSALS
    about_refusals = [
        r for r in caplog.records if r.levelno >= logging.INFO and "refus" in r.getMessage().lower()
    ]
    assert len(about_refusals) < REFUSALS, "refusals are logged without a throttle"
    for session in sessions:
        assert not [r for r in caplog.records if session in r.getMessage()], "a session id logged at info"
    async with http.delete(f"{proxy.url}/mcp", headers={"Mcp-Session-Id": sessions[0]}) as response:
        assert response.status == 200
    await open_session(http, proxy)  # a freed place is taken again


async def test_a_get_stream_does_not_keep_its_session_for_ever(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """An open GET stream is ended after --mcp-session-idle; then the idle session expires and
    its id answers a JSON 404 naming what to do."""
    proxy = await make_proxy(mcp_session_idle=1)
    session = await open_session(http, proxy)
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session, "Mcp-Protocol-Version": PROTOCOL}
    async with http.get(f"{proxy.url}/mcp", headers=headers) as stream:
        assert stream.status == 200
        await stream.read()  # returns once the proxy ends the stream
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    deadline = time.monotonic() + 30
    while True:
        async with http.post(
            f"{proxy.url}/mcp", json=ping, headers={**MCP_HEADERS, **headers, "Accept": MCP_HEADERS["Accept"]}
        ) as response:
            if response.status == 404:
                assert (await refusal(response))["code"] == "mcp_session_not_found"
                break
            assert response.status == 200, await response.text()
            await response.read()
        assert time.monotonic() < deadline, "the session never expired"
        await asyncio.sleep(1.2)  # longer than the idle time: the session may expire meanwhile
