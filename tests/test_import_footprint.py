"""What a serving proxy has imported: the parts of its dependencies it does not use stay out.

Idle memory is paid once per session (BENCHMARKS.md, "Memory"), so these are structural
checks, not timed ones: a real proxy process serves real requests, then lists ``sys.modules``
as it exits, and the test names what must not be there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import LISTENING, TOKEN, RunningProxy, exec_events, final, output_of

# Runs the CLI as ``python -m session_proxy`` does, and writes the loaded modules' names at exit.
LISTING_MODULES_AT_EXIT = """
import atexit, sys
def _write():
    with open(sys.argv.pop(1), "w") as file:
        file.write("\\n".join(sorted(sys.modules)))
atexit.register(_write)
from session_proxy.cli import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class ServingProxy:
    process: subprocess.Popen[bytes]
    running: RunningProxy
    modules_file: Path
    log: Path

    async def modules_at_exit(self) -> set[str]:
        """SIGTERM (a clean exit, as in a pod), then the names of every module it had loaded."""
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.process.wait, 30)
        assert code == 0, self.log.read_text()
        return set(self.modules_file.read_text().split())


Serve = Callable[..., Awaitable[ServingProxy]]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start proxies that list their modules at exit; any still running at teardown is killed."""
    started: list[subprocess.Popen[bytes]] = []

    async def start(*flags: str, env: dict[str, str] | None = None) -> ServingProxy:
        proxy = await _serve(tmp_path, *flags, env=env)
        started.append(proxy.process)
        return proxy

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


async def _serve(tmp_path: Path, *flags: str, env: dict[str, str] | None) -> ServingProxy:
    """``session-proxy serve`` in a process of its own, listing its modules when it exits."""
    log, modules_file = tmp_path / f"proxy-{time.monotonic_ns()}.log", tmp_path / "modules.txt"
    command = [sys.executable, "-c", LISTING_MODULES_AT_EXIT, str(modules_file), "serve",
               "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0", "--local-root", str(tmp_path),
               *flags]  # fmt: skip
    with log.open("wb") as file:
        environment = {**os.environ, **(env or {})}
        process = subprocess.Popen(command, stderr=file, stdout=subprocess.DEVNULL, env=environment)
    deadline = time.monotonic() + 30
    while not (match := LISTENING.search(log.read_bytes())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"the proxy did not start: {log.read_text()}")
        await asyncio.sleep(0.02)
    running = RunningProxy(server=None, url=match.group(1).decode(), ops_url=None)  # type: ignore[arg-type]
    return ServingProxy(process, running, modules_file, log)


def loaded(modules: set[str], package: str) -> list[str]:
    return sorted(name for name in modules if name == package or name.startswith(package + "."))


async def test_serving_in_cluster_leaves_kubernetes_asyncio_out(
    http: aiohttp.ClientSession, kube: Any, tmp_path: Path, serve: Serve
) -> None:
    """In a pod (token file, CA file, service variables) the proxy finds the workspace and runs a
    command through the API server without importing kubernetes_asyncio, its client package
    (every generated model) least of all."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    (tmp_path / "token").write_text(TOKEN + "\n")
    host, port = kube.url.removeprefix("https://").rsplit(":", 1)
    proxy = await serve(
        "--backend", "kubernetes", "--namespace", "default", "--session-name", "s1",
        "--token-file", str(tmp_path / "token"), "--ca-file", str(kube.write_ca(tmp_path / "ca.crt")),
        env={"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "KUBECONFIG": ""},
    )  # fmt: skip
    try:
        events = await exec_events(http, proxy.running, {"command": ["echo", "in cluster"]})
    finally:
        modules = await proxy.modules_at_exit()
    assert output_of(events, "stdout") == b"in cluster\n", events
    assert final(events)["exit_code"] == 0
    assert "session_proxy.backends.kubernetes.api" in modules  # the listing is of a Kubernetes proxy
    assert not (found := loaded(modules, "kubernetes_asyncio")), f"imported: {found[:8]}"


async def test_mcp_loads_the_sdks_server_side_only(serve: Serve) -> None:
    """The first MCP session (initialize, a tool call running a command) loads the SDK's server
    and Streamable HTTP transport, not its client, its high-level server, or uvicorn."""
    from .mcp_client import http_session

    proxy = await serve("--backend", "local")
    try:
        async with http_session(proxy.running.url) as session:
            result = await session.call_tool("exec", {"argv": ["echo", "over mcp"]})
    finally:
        modules = await proxy.modules_at_exit()
    assert not result.is_error, result
    assert "over mcp" in result.content[0].text  # type: ignore[union-attr]
    assert "mcp.server.streamable_http_manager" in modules  # the listing is after the SDK loaded
    for unused in ("mcp.client", "mcp.server.mcpserver", "uvicorn"):
        assert not (found := loaded(modules, unused)), f"imported: {found[:8]}"


def test_a_module_that_needs_the_whole_sdk_still_loads(tmp_path: Path) -> None:
    """Should the SDK's server modules come to need a package ``__init__``, the server-side
    loader falls back to the whole SDK, with a warning, rather than failing ``/mcp``."""
    (tmp_path / "needs_whole_sdk.py").write_text("from mcp import ClientSession\n")
    check = (
        "import logging, sys; logging.basicConfig(); "
        "from session_proxy.mcp.sdk import import_server_side; "
        "module, _ = import_server_side('needs_whole_sdk', 'mcp.server.streamable_http_manager'); "
        "print(module.ClientSession.__name__, 'mcp.client' in sys.modules)"
    )
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env=environment, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ClientSession", "True"]
    assert "need its whole package now" in done.stderr
