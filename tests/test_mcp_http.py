"""/mcp on the exec listener: guards, sessions, admission, metrics and logs, as for /exec."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import httpx2
import pytest
from mcp import Client

from session_proxy.keys import SUPERVISOR

from .conftest import ProxyFactory, RunningProxy, survivors, wait_for_processes
from .mcp_client import ProgressLog, http_session, text_of

pytestmark = pytest.mark.timeout(60)
PROTOCOL = "2025-11-25"
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def metrics_text(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        return await response.text()


async def post_initialize(
    http: aiohttp.ClientSession, proxy: RunningProxy, **headers: str
) -> aiohttp.ClientResponse:
    response = await http.post(f"{proxy.url}/mcp", json=INITIALIZE, headers={**MCP_HEADERS, **headers})
    await response.read()
    return response


async def test_foreign_origin_is_refused(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """Any Origin on /mcp is refused with 403 (MCP's DNS rebinding rule), even a loopback one."""
    for origin in ("http://evil.example", f"http://127.0.0.1:{proxy.port}"):
        response = await post_initialize(http, proxy, Origin=origin)
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "browser_request"
    assert (await post_initialize(http, proxy)).status == 200


async def test_foreign_host_is_refused(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A Host that is not this loopback listener is refused with 403 on /mcp."""
    response = await post_initialize(http, proxy, Host=f"evil.example:{proxy.port}")
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "bad_host"


async def test_token_is_required_when_configured(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """With --auth-token-file, /mcp answers 401 without the token or with a wrong one; the right one works."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    proxy = await make_proxy(auth_token_file=str(token_file))
    assert (await post_initialize(http, proxy)).status == 401
    assert (await post_initialize(http, proxy, Authorization="Bearer wrong-token-0123456789")).status == 401
    async with http_session(proxy.url, token="s3cret-token-0123456789") as session:
        result = await session.call_tool("exec", {"command": "echo through the token"})
    assert text_of(result) == "through the token\nexit code: 0"


async def test_client_going_away_ends_the_command(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """A client that drops the POST carrying a call ends its command (counted as client_gone)."""
    response = await post_initialize(http, proxy)
    session = {"Mcp-Session-Id": response.headers["Mcp-Session-Id"], "Mcp-Protocol-Version": PROTOCOL}
    headers = {**MCP_HEADERS, **session}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(f"{proxy.url}/mcp", json=initialized, headers=headers) as response:
        assert response.status == 202
    arguments = {"command": f"sleep {marker} & sleep {marker}"}
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "exec", "arguments": arguments},
    }
    async with aiohttp.ClientSession() as dropping:
        response = await dropping.post(f"{proxy.url}/mcp", json=call, headers=headers)
        assert response.status == 200
        await wait_for_processes(marker, 2)
        response.close()
    assert await survivors(marker, within=10) == []
    text = await metrics_text(http, proxy)
    assert metric(text, "session_proxy_exec_requests_total", 'outcome="client_gone"') == 1


async def test_rate_limited_call_is_a_tool_error_with_a_retry_hint(make_proxy: ProxyFactory) -> None:
    """Over the rate limit, exec is not run: a tool error that says when to retry."""
    proxy = await make_proxy(rate_limit=0.01, rate_burst=1, rate_limit_wait=0)
    async with http_session(proxy.url) as session:
        first = await session.call_tool("exec", {"command": "echo one"})
        second = await session.call_tool("exec", {"command": "echo two"})
    assert first.is_error is False
    assert second.is_error is True
    assert second.structured_content is None
    assert "rate_limited" in text_of(second)
    assert "retry in " in text_of(second)


async def test_over_the_concurrency_cap_is_a_tool_error(make_proxy: ProxyFactory, marker: str) -> None:
    """With every slot taken, exec is refused as a tool error naming the limit and a retry delay."""
    proxy = await make_proxy(max_concurrent=1)
    async with http_session(proxy.url) as session:
        running = asyncio.create_task(session.call_tool("exec", {"command": f"sleep {marker}"}))
        await wait_for_processes(marker, 1)
        refused = await session.call_tool("exec", {"command": "echo two"})
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert refused.is_error is True
    assert "concurrency_limit" in text_of(refused)
    assert "retry in " in text_of(refused)
    assert await survivors(marker) == []


async def test_metrics_and_log_line_count_mcp_execs(
    http: aiohttp.ClientSession, proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """An MCP exec is an exec: counted by outcome, and logged once with its exec id."""
    caplog.set_level(logging.INFO)
    async with http_session(proxy.url) as session:
        await session.call_tool("exec", {"command": "exit 4"})
        await session.call_tool("exec", {"command": "sleep 5", "timeout": 0.5})
    text = await metrics_text(http, proxy)
    assert metric(text, "session_proxy_exec_requests_total", 'outcome="exited"') == 1
    assert metric(text, "session_proxy_exec_requests_total", 'outcome="timeout"') == 1
    exec_lines = [r for r in caplog.records if r.getMessage() == "exec finished"]
    mcp_lines = [r for r in caplog.records if r.getMessage() == "mcp exec finished"]
    assert [r.outcome for r in exec_lines] == ["exited", "timeout"]  # type: ignore[attr-defined]
    assert [r.exec_id for r in mcp_lines] == [r.exec_id for r in exec_lines]  # type: ignore[attr-defined]


async def test_the_current_protocol_version_works(proxy: RunningProxy) -> None:
    """A 2026-07-28 client (no session, one exchange per request) gets results and progress too."""
    progress = ProgressLog()
    async with Client(f"{proxy.url}/mcp", mode="2026-07-28") as client:
        tools = await client.list_tools()
        result = await client.call_tool(
            "exec", {"command": "echo modern; sleep 1.2; echo done"}, progress_callback=progress
        )
    assert {tool.name for tool in tools.tools} == {"exec", "status", "logs"}
    assert text_of(result) == "modern\ndone\nexit code: 0"
    assert any("modern" in message for message in progress.messages)


@pytest.mark.parametrize("version", ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"])
async def test_every_handshake_version_is_accepted(
    http: aiohttp.ClientSession, proxy: RunningProxy, version: str
) -> None:
    """An initialize offering any protocol version the SDK supports gets that version back."""
    hello = {**INITIALIZE, "params": {**INITIALIZE["params"], "protocolVersion": version}}  # type: ignore[dict-item]
    async with http.post(f"{proxy.url}/mcp", json=hello, headers=MCP_HEADERS) as response:
        body = await response.text()
    assert response.status == 200
    data = next(line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: {"))
    assert json.loads(data)["result"]["protocolVersion"] == version


async def test_status_and_logs_tools(proxy: RunningProxy) -> None:
    """status returns the /status document and a summary; logs says the local backend has none."""
    async with http_session(proxy.url) as session:
        status = await session.call_tool("status", {})
        logs = await session.call_tool("logs", {"tail": 5})
        bad_tail = await session.call_tool("logs", {"tail": -1})
    assert status.structured_content["backend"] == "local"
    assert status.structured_content["ready"] is True
    assert "is ready to run commands" in text_of(status)
    assert logs.is_error is True
    assert text_of(logs).startswith("There is no workspace container log here: commands run as local")
    assert bad_tail.is_error is True


async def test_shutdown_ends_open_mcp_sessions(make_proxy: ProxyFactory, marker: str) -> None:
    """Stopping the proxy with a session open and a call running ends the command and returns."""
    proxy = await make_proxy()
    async with http_session(proxy.url) as session:
        call = asyncio.create_task(session.call_tool("exec", {"command": f"sleep {marker}"}))
        await wait_for_processes(marker, 1)
        while proxy.server.exec_app[SUPERVISOR].in_flight == 0:  # registered for the drain
            await asyncio.sleep(0.01)
        async with asyncio.timeout(30):  # aiohttp's own wait for open requests would be 60 s
            await proxy.server.stop()
        result = await call
    assert result.is_error is True
    assert result.structured_content is not None, result.content
    assert result.structured_content["reason"] == "shutdown"
    assert await survivors(marker) == []


def test_sdk_is_loaded_on_first_use(tmp_path: Path) -> None:
    """A proxy without MCP clients never imports the SDK; the first /mcp request does."""
    script = f"""
import asyncio, sys, aiohttp
from session_proxy.server import ProxyServer
from session_proxy.settings import Settings

def sdk_loaded():
    return any(name == "mcp" or name.startswith("mcp.") for name in sys.modules)

async def main():
    settings = Settings(listen="127.0.0.1:0", ops_listen="", backend="local", local_root={str(tmp_path)!r})
    server = ProxyServer(settings)
    await server.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(server.exec_url + "/exec", json={{"command": ["true"]}}) as response:
            await response.read()
        print("before", sdk_loaded())
        async with http.post(server.exec_url + "/mcp", json={json.dumps(INITIALIZE)},
                             headers={json.dumps(MCP_HEADERS)}) as response:
            print("status", response.status)
        print("after", sdk_loaded())
    await server.stop()

asyncio.run(main())
"""
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert output.stdout.split() == ["before", "False", "status", "200", "after", "True"], output.stderr


async def test_unix_socket_listener(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """On a unix socket listener, /mcp works and its tools reach the exec API through that socket."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    socket_path = tmp_path / "exec.sock"
    await make_proxy(listen=f"unix:{socket_path}")
    transport = httpx2.AsyncHTTPTransport(uds=str(socket_path))
    async with (
        httpx2.AsyncClient(transport=transport) as client,
        streamable_http_client("http://localhost/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool("exec", {"command": "echo over the socket"})
    assert text_of(result) == "over the socket\nexit code: 0"


@pytest.mark.parametrize(
    "path",
    ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource",
     "/.well-known/oauth-authorization-server", "/.well-known/openid-configuration", "/register"],
)  # fmt: skip
async def test_oauth_discovery_is_404_even_without_the_token(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path, path: str
) -> None:
    """The proxy has no OAuth: discovery finds nothing (404), so a client reports the 401 of /mcp."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    proxy = await make_proxy(auth_token_file=str(token_file))
    method = http.post if path == "/register" else http.get
    async with method(f"{proxy.url}{path}") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
    assert (await post_initialize(http, proxy)).status == 401
