"""Third-party MCP clients against the proxy as shipped: the TypeScript SDK, Claude Code, the
official conformance suite. Their npm packages are pinned in ``tests/clients`` (``npm ci``
there, as ``.ci/run`` does); Node 22 comes from the npm ``node`` package, which the Claude
Code CLI and the conformance suite need.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .conftest import ProxyFactory, RunningProxy, survivors
from .test_mcp_http import metric, metrics_text
from .test_mcp_manifests import SERVER_NAME

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "tests" / "clients"
BIN = CLIENTS / "node_modules" / ".bin"
SHIPPED_TOKEN_FILE = "/run/session-proxy/token"


def node_tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: run `npm ci` in tests/clients (.ci/run does)"
    return str(path)


async def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def token_proxy(make_proxy: ProxyFactory, tmp_path: Path) -> tuple[RunningProxy, Path]:
    token_file = tmp_path / "token"
    return await make_proxy(auth_token_file=str(token_file)), token_file


def bridge_command(proxy: RunningProxy) -> list[str]:
    return [sys.executable, "-m", "session_proxy", "mcp", "--url", proxy.url]


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_typescript_sdk(make_proxy: ProxyFactory, tmp_path: Path, marker: str, transport: str) -> None:
    """The TS SDK on Node's fetch: connect, list, exec, live progress, and a cancel that ends the command."""
    proxy, token_file = await token_proxy(make_proxy, tmp_path)
    options: dict[str, Any] = {"marker": marker, "gate": str(tmp_path / "gate")}
    if transport == "http":
        options.update(url=f"{proxy.url}/mcp", token=token_file.read_text().strip())
    else:
        options.update(stdio=bridge_command(proxy), env={"SESSION_PROXY_AUTH_TOKEN_FILE": str(token_file)})
    code, stdout, stderr = await run(
        [node_tool("node"), str(CLIENTS / "ts_sdk.mjs"), json.dumps(options)], cwd=tmp_path
    )
    assert code == 0, stdout + stderr
    steps = {step["step"]: step for step in map(json.loads, stdout.splitlines())}
    assert steps["listed"]["tools"] == ["exec", "status", "logs", "job_output", "job_end"]
    assert steps["exec"]["text"] == "hello from node\nexit code: 0"
    assert steps["exec"]["structured"]["exit_code"] == 0
    assert steps["progress"]["message"] == f"ready-{marker}"
    assert "the test cancels it" in steps["aborted"]["outcome"]
    assert "closed" in steps
    assert await survivors(marker) == []
    async with aiohttp.ClientSession() as http:
        text = await metrics_text(http, proxy)
    assert metric(text, "session_proxy_exec_requests_total", 'outcome="client_gone"') == 1


def shipped_mcp_json() -> str:
    """The .mcp.json of the session template's ConfigMap, as the agent container gets it."""
    template = ROOT / "manifests" / "session" / "runner-pod.yaml"
    for document in yaml.safe_load_all(template.read_text()):
        if document and document["kind"] == "ConfigMap" and ".mcp.json" in document["data"]:
            return str(document["data"][".mcp.json"])
    raise AssertionError(f"no ConfigMap with a .mcp.json in {template}")


async def claude_mcp_list(tmp_path: Path, mcp_json: str, *, trusted: bool = True) -> str:
    """``claude mcp list`` in a project holding ``mcp_json``, with a fresh HOME (no login needed).

    The project's servers are approved in the user's settings; ``trusted`` records the trust
    dialog as accepted, without which Claude Code does not run a ``headersHelper``.
    """
    home, project = tmp_path / "home", tmp_path / "project"
    (home / ".claude").mkdir(parents=True)
    project.mkdir()
    (project / ".mcp.json").write_text(mcp_json)
    (home / ".claude" / "settings.json").write_text(json.dumps({"enableAllProjectMcpServers": True}))
    projects = {str(project): {"hasTrustDialogAccepted": True}} if trusted else {}
    (home / ".claude.json").write_text(json.dumps({"projects": projects}))
    env = {
        "HOME": str(home),
        "PATH": os.environ["PATH"],
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    code, stdout, stderr = await run([node_tool("claude"), "mcp", "list"], cwd=project, env=env)
    assert code == 0, stdout + stderr
    return stdout + stderr


async def test_claude_code_connects_with_the_shipped_mcp_json(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The runner pod's .mcp.json, its headersHelper reading the token file: Claude Code connects."""
    proxy, token_file = await token_proxy(make_proxy, tmp_path)
    mcp_json = shipped_mcp_json().replace("127.0.0.1:8081", f"127.0.0.1:{proxy.port}")
    output = await claude_mcp_list(tmp_path, mcp_json.replace(SHIPPED_TOKEN_FILE, str(token_file)))
    assert f"{SERVER_NAME}: {proxy.url}/mcp (HTTP) - ✔ Connected" in output, output


async def test_claude_code_connects_over_stdio(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """``session-proxy mcp`` as a stdio server of Claude Code: connected."""
    proxy, token_file = await token_proxy(make_proxy, tmp_path)
    server = {
        "command": sys.executable,
        "args": bridge_command(proxy)[1:],
        "env": {"SESSION_PROXY_AUTH_TOKEN_FILE": str(token_file)},
    }
    output = await claude_mcp_list(tmp_path, json.dumps({"mcpServers": {SERVER_NAME: server}}))
    assert f"{SERVER_NAME}: {sys.executable} " in output, output
    assert "✔ Connected" in output, output


async def test_claude_code_without_the_token_is_told_how_to_send_it(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """No token (the helper does not run in an untrusted folder): the error names the token, not OAuth."""
    proxy, _ = await token_proxy(make_proxy, tmp_path)
    mcp_json = shipped_mcp_json().replace("127.0.0.1:8081", f"127.0.0.1:{proxy.port}")
    output = await claude_mcp_list(tmp_path, mcp_json, trusted=False)
    assert "✘ Failed to connect" in output, output
    assert "session-proxy has no OAuth" in output, output
    assert "SESSION_PROXY_AUTH_TOKEN_FILE" in output, output


async def test_conformance_server_scenarios(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """The official conformance suite's server scenarios: all pass but those the baseline names.

    The suite speaks Streamable HTTP only (no stdio server mode) and sends no custom header,
    so it runs against /mcp without a token. The baseline says why each listed scenario does
    not apply; a listed scenario that passes fails the run too (the suite checks that). It opens
    a session per scenario (about thirty) and deletes none: many clients at once, not the one
    agent the default session cap is sized for, so the cap is raised here.
    """
    proxy = await make_proxy(mcp_max_sessions=64)
    baseline = CLIENTS / "conformance-baseline.yml"
    suite = [node_tool("node"), node_tool("conformance"), "server", "--url", f"{proxy.url}/mcp"]
    code, stdout, stderr = await run(
        [*suite, "--expected-failures", str(baseline), "-o", str(tmp_path / "results")], cwd=tmp_path
    )
    assert code == 0, stdout[-4000:] + stderr[-2000:]
    assert "✓ tools-call-simple-text" in stdout, stdout[-4000:]


async def test_claude_code_takes_the_readme_server_names(tmp_path: Path) -> None:
    """Every `claude mcp add` in the README names a server Claude Code accepts (it reserves some)."""
    readme = (ROOT / "README.md").read_text()
    names = set(re.findall(r"claude mcp add (?:--transport http )?([\w-]+)", readme))
    assert names == {SERVER_NAME}
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "DISABLE_AUTOUPDATER": "1"}
    for transport in ("http", "stdio"):
        command = [node_tool("claude"), "mcp", "add", SERVER_NAME]
        if transport == "http":
            command[3:3] = ["--transport", "http"]
            command.append("http://127.0.0.1:1/mcp")
        else:
            command += ["--", "session-proxy", "mcp"]
        code, stdout, stderr = await run(command, cwd=home, env=env)
        assert code == 0, stdout + stderr
        assert "reserved" not in stdout + stderr
        code, stdout, stderr = await run(
            [node_tool("claude"), "mcp", "remove", SERVER_NAME], cwd=home, env=env
        )
        assert code == 0, stdout + stderr
