"""``session-proxy mcp``: the stdio bridge forwards to a running proxy and ends what it started."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ProxyFactory, RunningProxy, survivors, wait_for_processes
from .mcp_client import connect, stdio_session, text_of

pytestmark = pytest.mark.timeout(60)


async def test_token_from_the_environment(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """The bridge sends the token from SESSION_PROXY_AUTH_TOKEN_FILE (exec and status); without it, 401."""
    token_file = tmp_path / "token"
    token_file.write_text("bridge-token-0123456789\n")
    proxy = await make_proxy(auth_token_file=str(token_file))
    env = {"SESSION_PROXY_AUTH_TOKEN_FILE": str(token_file)}
    async with stdio_session(proxy.url, tmp_path, env=env) as session:
        allowed = await session.call_tool("exec", {"command": "echo allowed"})
        status = await session.call_tool("status", {})
    async with stdio_session(proxy.url, tmp_path) as session:
        refused = await session.call_tool("exec", {"command": "echo refused"})
    assert text_of(allowed) == "allowed\nexit code: 0"
    assert status.is_error is False
    assert status.structured_content["backend"] == "local"
    assert refused.is_error is True
    assert "401 unauthorized" in text_of(refused)


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_default_workdir(make_proxy: ProxyFactory, tmp_path: Path, transport: str) -> None:
    """--mcp-workdir is where a command starts when the call names no workdir; a call can name another."""
    default = tmp_path / "default"
    default.mkdir()
    proxy = await make_proxy(mcp_workdir=str(default))
    async with connect(transport, proxy.url, tmp_path, flags=("--mcp-workdir", str(default))) as session:
        implicit = await session.call_tool("exec", {"command": "pwd"})
        explicit = await session.call_tool("exec", {"command": "pwd", "workdir": str(tmp_path)})
    assert text_of(implicit) == f"{default}\nexit code: 0"
    assert text_of(explicit) == f"{tmp_path}\nexit code: 0"


def bridge(proxy: RunningProxy, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "session_proxy", "mcp", "--url", proxy.url, *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def send(process: subprocess.Popen[bytes], message: dict[str, object]) -> None:
    assert process.stdin is not None
    process.stdin.write(json.dumps(message).encode() + b"\n")
    process.stdin.flush()


@pytest.mark.parametrize("how", ["stdin closed", "killed"])
async def test_client_going_away_ends_the_command(proxy: RunningProxy, marker: str, how: str) -> None:
    """When the client closes the bridge's stdin, or the bridge dies, the running command ends."""
    process = bridge(proxy)
    try:
        hello = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        }
        send(process, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello})
        assert process.stdout is not None
        reply = await asyncio.to_thread(process.stdout.readline)
        assert json.loads(reply)["id"] == 1
        send(process, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        arguments = {"command": f"sleep {marker} & sleep {marker}"}
        send(process, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                       "params": {"name": "exec", "arguments": arguments}})  # fmt: skip
        await wait_for_processes(marker, 2)
        if how == "killed":
            process.send_signal(signal.SIGKILL)
        else:
            assert process.stdin is not None
            process.stdin.close()
        assert await survivors(marker, within=10) == []
        assert await asyncio.to_thread(process.wait, 20) is not None
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize(
    ("flags", "env", "complaint"),
    [
        (("--mcp-workdir", "relative"), {}, "must be absolute"),
        (("--mcp-max-output-chars", "10"), {}, ">= 1000"),
        ((), {"SESSION_PROXY_AUTH_TOKEN_FILE": "/nonexistent/token"}, "cannot read the proxy token"),
    ],
)
def test_bad_configuration_stops_the_bridge(
    flags: tuple[str, ...], env: dict[str, str], complaint: str
) -> None:
    """A bad flag or an unreadable token file: exit code 2 and one line saying what is wrong."""
    result = subprocess.run(
        [sys.executable, "-m", "session_proxy", "mcp", "--url", "http://127.0.0.1:1", *flags],
        input=b"",
        capture_output=True,
        env={**os.environ, **env},
        timeout=30,
    )
    assert result.returncode == 2
    assert complaint in result.stderr.decode()
