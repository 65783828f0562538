"""The runner pod tells the agent where MCP is: an .mcp.json in a ConfigMap and the URL in its env."""

from __future__ import annotations

import copy
import json
import posixpath
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from session_proxy.settings import Settings, parse_listen_address

from .conftest import ProxyFactory
from .manifest_rules import Objects, pods, sidecar_of
from .mcp_client import text_of

ROOT = Path(__file__).resolve().parent.parent
SERVER_NAME = "session-workspace"  # the README's name; Claude Code refuses "workspace" as reserved
RESERVED_NAMES = frozenset({"workspace"})


@pytest.fixture(scope="module")
def rendered() -> Objects:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required to render the kustomize base"
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "manifests" / "examples" / "session")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


def mcp_config(objects: Objects, name: str) -> dict[str, Any] | None:
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == name:
            return dict(json.loads(obj["data"][".mcp.json"]))
    return None


def mcp_wiring_problems(objects: Objects) -> list[str]:
    """Every agent next to the sidecar gets the MCP URL, and a mounted .mcp.json that names it."""
    exec_port = parse_listen_address(Settings(backend="local").listen).port  # type: ignore[union-attr]
    expected_url = f"http://127.0.0.1:{exec_port}/mcp"
    problems = []
    for pod in pods(objects):
        sidecar = sidecar_of(pod)
        if sidecar is None:
            continue
        workdir = env_of(sidecar).get("SESSION_PROXY_MCP_WORKDIR")
        if workdir is not None and not workdir.startswith("/"):
            problems.append(f"SESSION_PROXY_MCP_WORKDIR {workdir!r} is not absolute")
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        for container in pod["spec"]["containers"]:
            env = env_of(container)
            if "SESSION_PROXY_URL" not in env:
                continue
            if env.get("SESSION_PROXY_MCP_URL") != expected_url:
                problems.append(f"{container['name']}: SESSION_PROXY_MCP_URL is not {expected_url}")
            config_path = env.get("SESSION_PROXY_MCP_CONFIG", "")
            mounts = [
                m
                for m in container.get("volumeMounts") or []
                if m["mountPath"] == posixpath.dirname(config_path)
            ]
            if not mounts or not mounts[0].get("readOnly"):
                problems.append(f"{container['name']}: {config_path!r} is not mounted read-only")
                continue
            config_map = volumes.get(mounts[0]["name"], {}).get("configMap", {}).get("name", "")
            config = mcp_config(objects, config_map)
            if config is None:
                problems.append(f"{container['name']}: no ConfigMap {config_map!r} with an .mcp.json")
                continue
            reserved = RESERVED_NAMES & set(config["mcpServers"])
            if reserved:
                problems.append(f".mcp.json names a server a client reserves: {sorted(reserved)}")
            server = config["mcpServers"].get(SERVER_NAME, {})
            if server.get("type") != "http" or server.get("url") != expected_url:
                problems.append(f".mcp.json does not name {expected_url} over http: {server}")
            if env["SESSION_PROXY_AUTH_TOKEN_FILE"] not in server.get("headersHelper", ""):
                problems.append(".mcp.json's headersHelper does not read the agent's token file")
    return problems


def test_shipped_manifests_wire_mcp(rendered: Objects) -> None:
    """The shipped runner pod passes the MCP wiring rule."""
    assert mcp_wiring_problems(rendered) == []


def _agent(objects: Objects) -> dict[str, Any]:
    return next(c for p in pods(objects) for c in p["spec"]["containers"] if c["name"] == "agent")


def _set_env(name: str, value: str) -> Callable[[Objects], None]:
    def mutate(objects: Objects) -> None:
        for entry in _agent(objects)["env"]:
            if entry["name"] == name:
                entry["value"] = value

    return mutate


def _unmount_config(objects: Objects) -> None:
    agent = _agent(objects)
    agent["volumeMounts"] = [m for m in agent["volumeMounts"] if m["name"] != "session-mcp"]


def _edit_config(old: str, new: str) -> Callable[[Objects], None]:
    def mutate(objects: Objects) -> None:
        config_map = next(
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "session-mcp-demo"
        )
        config_map["data"][".mcp.json"] = config_map["data"][".mcp.json"].replace(old, new)

    return mutate


@pytest.mark.parametrize(
    ("mistake", "mutate"),
    [
        ("MCP URL on the ops port", _set_env("SESSION_PROXY_MCP_URL", "http://127.0.0.1:9464/mcp")),
        ("config file not mounted", _unmount_config),
        (".mcp.json names the ops port", _edit_config(":8081/", ":9464/")),
        (".mcp.json uses a reserved name", _edit_config(f'"{SERVER_NAME}"', '"workspace"')),
        (
            "token file moved without the helper",
            _set_env("SESSION_PROXY_AUTH_TOKEN_FILE", "/elsewhere/token"),
        ),
    ],
)
def test_rule_catches_the_mistake(rendered: Objects, mistake: str, mutate: Callable[[Objects], None]) -> None:
    """Each wiring mistake is reported."""
    broken = copy.deepcopy(rendered)
    mutate(broken)
    assert mcp_wiring_problems(broken), f"not noticed: {mistake}"


async def test_the_shipped_mcp_json_reaches_a_real_proxy(
    rendered: Objects, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The .mcp.json's headersHelper, run as the agent would, yields a header the proxy accepts."""
    from .mcp_client import http_session

    token_file = tmp_path / "token"
    proxy = await make_proxy(auth_token_file=str(token_file))  # the proxy creates the token
    agent_token_file = env_of(_agent(rendered))["SESSION_PROXY_AUTH_TOKEN_FILE"]
    config = mcp_config(rendered, "session-mcp-demo")
    assert config is not None
    helper = config["mcpServers"][SERVER_NAME]["headersHelper"].replace(agent_token_file, str(token_file))
    headers = json.loads(
        subprocess.run(["sh", "-c", helper], capture_output=True, check=True, timeout=10).stdout
    )
    token = headers["Authorization"].removeprefix("Bearer ")
    async with http_session(proxy.url, token=token) as session:
        result = await session.call_tool("exec", {"command": "echo configured"})
    assert text_of(result) == "configured\nexit code: 0"
