"""Fixtures: a real proxy on loopback (in-process or as a subprocess) and helpers to talk to it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from session_proxy.server import ProxyServer
from session_proxy.settings import Settings


@dataclass
class RunningProxy:
    server: ProxyServer
    url: str
    ops_url: str | None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start real proxies on loopback port 0; each is stopped (drained) at teardown.

    ``exec_backend`` injects a backend object (a real one wrapped to fail on purpose, say).
    """
    started: list[ProxyServer] = []

    async def start(*, exec_backend: Any = None, **overrides: Any) -> RunningProxy:
        values: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "ops_listen": "127.0.0.1:0",
            "local_root": tmp_path,
            "kill_grace": 1,
            "shutdown_grace": 1,
            "rate_limit": 0,
            "backend": "local",
        }
        values.update(overrides)
        server = ProxyServer(Settings.model_validate(values), backend=exec_backend)
        await server.start()
        started.append(server)
        return RunningProxy(server, server.exec_url, server.ops_url)

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> RunningProxy:
    return await make_proxy()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def exec_events(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """POST /exec and return all events; fails the test on a non-200 answer."""
    async with http.post(f"{proxy.url}/exec", json=body) as response:
        text = await response.text()
        assert response.status == 200, text
        assert response.headers["Content-Type"] == "application/x-ndjson"
    # NDJSON lines end at "\n" only: str.splitlines would also cut inside text at U+0085, U+2028...
    return [json.loads(line) for line in text.split("\n") if line]


def output_of(events: list[dict[str, Any]], stream: str) -> bytes:
    """Reassemble a stream's bytes from its events, text and base64 alike."""
    import base64

    parts = []
    for event in events:
        if event["type"] == stream:
            if "data_b64" in event:
                parts.append(base64.b64decode(event["data_b64"]))
            else:
                parts.append(event["data"].encode())
    return b"".join(parts)


def final(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The exit event, after checking it is the only one and the last."""
    exits = [e for e in events if e["type"] == "exit"]
    assert len(exits) == 1, events
    assert events[-1] is exits[0]
    return exits[0]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` if it has not within ``within`` s."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def marker() -> str:
    """A unique sleep length, so this test's processes can be found (and only those)."""
    return f"300.{uuid.uuid4().int % 10**9:09d}"


def forking(marker: str, before: str = "") -> list[str]:
    """A command with a background and a foreground child, both long sleepers carrying ``marker``."""
    return ["sh", "-c", f"{before}sleep {marker} & sleep {marker}"]


def image_without_setsid(tmp_path: Path) -> str:
    """A PATH offering a shell and the basics, but no setsid."""
    bin_dir = tmp_path / "image-bin"
    bin_dir.mkdir()
    for tool in ("sh", "head", "cat", "sleep", "env"):
        target = shutil.which("dash" if tool == "sh" else tool)
        assert target
        (bin_dir / tool).symlink_to(target)
    return str(bin_dir)


def live_processes(matches: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    """The processes (zombies aside) that ``matches``; one that ends or hides while it is
    looked at is skipped."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and matches(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


async def still_there(find: Callable[[], list[psutil.Process]], within: float) -> list[psutil.Process]:
    """What ``find`` still returns after polling up to ``within`` seconds for it to be empty."""
    deadline = time.monotonic() + within
    while (left := find()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


def processes_with(marker: str) -> list[psutil.Process]:
    return live_processes(lambda process: any(marker in part for part in process.info["cmdline"] or []))


async def survivors(marker: str, within: float = 10.0) -> list[psutil.Process]:
    """Processes still carrying ``marker`` after polling up to ``within`` seconds."""
    return await still_there(lambda: processes_with(marker), within)


def pod_processes(pod_uid: str) -> list[psutil.Process]:
    """The shells (``sh -c SCRIPT``: wrappers, waiting or running) the API test server started
    for the pod with this uid. (A wrapper's deadline ``sleep`` can outlive it: a known wrapper
    race, left to the wrapper script's own fix, so it is not counted here.)"""
    return live_processes(
        lambda process: (
            (process.info["cmdline"] or [])[1:2] == ["-c"]
            and process.environ().get("FAKE_POD_UID") == pod_uid
        )
    )


async def pod_survivors(pod_uid: str, within: float = 10.0) -> list[psutil.Process]:
    """The pod's shells still alive after polling up to ``within`` seconds."""
    return await still_there(lambda: pod_processes(pod_uid), within)


async def wait_for_processes(marker: str, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while len(processes_with(marker)) < count:
        assert time.monotonic() < deadline, f"{count} processes with {marker} never appeared"
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def no_leftovers(marker: str) -> Iterator[None]:
    """Whatever a test does, nothing it started may outlive it."""
    yield
    left = processes_with(marker)
    for process in left:
        process.kill()
    assert not left, f"processes left running: {[p.pid for p in left]}"


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    url: str
    ops_url: str | None
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]


LISTENING = re.compile(rb'"exec_url": "([^"]+)", "ops_url": (null|"[^"]+")')
LISTENING_TEXT = re.compile(rb"listening exec_url=(\S+) ops_url=(None|\S+)")


@pytest.fixture
def spawn_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Run ``python -m session_proxy serve`` as its own process, as a user would."""
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn(*flags: str, env: dict[str, str] | None = None) -> ProxyProcess:
        log_path = tmp_path / f"proxy-{len(spawned)}.log"
        command = [
            sys.executable, "-m", "session_proxy", "serve",
            "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0",
            "--local-root", str(tmp_path), "--backend", "local", *flags,
        ]  # fmt: skip
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            command, stderr=log_file, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
        log_file.close()
        spawned.append(process)
        deadline = time.monotonic() + 20
        while not (match := LISTENING.search(log := log_path.read_bytes()) or LISTENING_TEXT.search(log)):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.02)
        ops = match.group(2).decode()
        return ProxyProcess(
            process, match.group(1).decode(), None if ops in ("null", "None") else ops.strip('"'), log_path
        )

    yield spawn
    for process in spawned:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


TOKEN = "token-a-0123456789"


@pytest.fixture(params=["modern", "old"])
def api_mode(request: pytest.FixtureRequest) -> str:
    """Each Kubernetes test runs against a modern (v5+v4) and an old (v4 only) API server."""
    return str(request.param)


@pytest.fixture
async def kube(tmp_path: Path, api_mode: str) -> AsyncIterator[Any]:
    """A Kubernetes API test server over HTTPS with one valid token."""
    from .kube_api_server import KubeApiServer

    server = KubeApiServer(tmp_path / "kube", mode=api_mode)
    (tmp_path / "kube").mkdir()
    server.add_token(TOKEN)
    await server.start()
    yield server
    await server.stop()


@dataclass
class KubeSetup:
    api: Any  # KubeApiServer
    proxy: RunningProxy
    pod: Any  # FakePod
    path: str = "cold"  # "warm": requests are meant to start on pre-opened execs
    runner: str = "shell"  # "supervisor": the pod carries the workspace supervisor


@pytest.fixture(params=["cold", "warm"])
def exec_path(request: pytest.FixtureRequest) -> str:
    """Kubernetes exec tests run on a new exec per command (cold) and on a warm pool's (warm)."""
    return str(request.param)


@pytest.fixture(params=["supervisor", "shell"])
def runner(request: pytest.FixtureRequest) -> str:
    """Kubernetes exec tests run in a pod that carries the workspace supervisor and in one that
    does not (the shell wrapper runs commands there)."""
    return str(request.param)


def runner_settings(runner: str, tmp_path: Path) -> dict[str, Any]:
    """The proxy settings for a runner: the supervisor's path, where the "pod" (the test server
    runs real local processes) has the built binary, or a path where it has nothing."""
    from .supervisor_build import supervisor_binary

    where = supervisor_binary() if runner == "supervisor" else tmp_path / "no-supervisor-here"
    return {"workspace_supervisor": str(where)}


def path_settings(exec_path: str) -> dict[str, Any]:
    """The proxy settings for a path: the pool off for cold, two warm execs for warm."""
    return {"warm_execs": 0 if exec_path == "cold" else 2}


async def warm_pool_state(proxy: RunningProxy) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/status") as response:
        pool: dict[str, Any] = (await response.json())["target"].get("warm_pool") or {}
    return pool


async def wait_for_pool(proxy: RunningProxy, ready: int, within: float = 20.0) -> dict[str, Any]:
    """Poll /status until the warm pool holds at least (or, for 0, exactly) ``ready`` execs."""
    deadline = time.monotonic() + within
    while True:
        pool = await warm_pool_state(proxy)
        if (pool.get("ready", 0) >= ready) if ready else not pool.get("ready"):
            return pool
        assert time.monotonic() < deadline, f"warm pool never reached {ready}: {pool}"
        await asyncio.sleep(0.02)


async def prewarm(http: aiohttp.ClientSession, proxy: RunningProxy, exec_path: str) -> None:
    """On the warm path, the first request opens the pool; wait until it is full."""
    if exec_path == "warm":
        await exec_events(http, proxy, {"command": ["true"]})
        await wait_for_pool(proxy, 2)


async def kube_exec(
    http: aiohttp.ClientSession, setup: KubeSetup, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """POST /exec on the setup's path, and prove the path taken: on warm, the start event says
    so and the API server saw no new exec for this request (only, perhaps, its kill exec)."""
    if setup.path == "warm":
        await wait_for_pool(setup.proxy, 1)
    events = await exec_events(http, setup.proxy, body)
    check_path(setup, events)
    return events


async def fresh_setup(
    http: aiohttp.ClientSession, setup: KubeSetup, make_proxy: ProxyFactory, tmp_path: Path
) -> KubeSetup:
    """A new proxy on the same pod and path, for tests that change the image first (its tools
    are probed, and warm execs opened, with what the image has now)."""
    settings = {**path_settings(setup.path), **runner_settings(setup.runner, tmp_path)}
    proxy = await kube_proxy(setup.api, make_proxy, tmp_path, workspace_wait=3, **settings)
    await prewarm(http, proxy, setup.path)
    return KubeSetup(setup.api, proxy, setup.pod, setup.path, setup.runner)


def check_path(setup: KubeSetup, events: list[dict[str, Any]]) -> None:
    start = next(e for e in events if e["type"] == "start")
    assert start["warm"] is (setup.path == "warm"), start
    assert start["guarantees"]["runner"] == setup.runner, start
    own_agent = f"exec_id={start['exec_id']}"  # its probe and kill execs say "-probe", "-kill"
    mine = [r for r in setup.api.exec_requests() if r.headers.get("User-Agent", "").endswith(own_agent)]
    assert len(mine) == (0 if setup.path == "warm" else 1), [r.headers.get("User-Agent") for r in mine]


def kube_credentials(kube: Any, tmp_path: Path) -> dict[str, Any]:
    """How a proxy reaches ``kube``: a kubeconfig; or, with SESSION_PROXY_TEST_IN_CLUSTER=1 (and
    TLS), what a pod has: the service variables and the token and CA files. The suite runs in
    either mode."""
    if os.environ.get("SESSION_PROXY_TEST_IN_CLUSTER") != "1" or not kube.tls:
        return {"kubeconfig": str(kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN))}
    host, port = kube.url.removeprefix("https://").rsplit(":", 1)
    os.environ.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=port)  # read at start-up
    token_file = tmp_path / "sa-token"
    token_file.write_text(TOKEN + "\n")
    return {"token_file": str(token_file), "ca_file": str(kube.write_ca(tmp_path / "sa-ca.crt"))}


async def kube_proxy(kube: Any, make_proxy: ProxyFactory, tmp_path: Path, **overrides: Any) -> RunningProxy:
    """A proxy on the kubernetes backend, pointed at ``kube`` (see ``kube_credentials``)."""
    # No warm pool unless asked for (path_settings): fault-injection tests match the execs they
    # break in order, and the pool's own background opens would take those faults.
    values: dict[str, Any] = {
        "backend": "kubernetes", **kube_credentials(kube, tmp_path), "namespace": "default",
        "session_name": "s1", "workspace_wait": 1, "kill_grace": 1, "warm_execs": 0,
    }  # fmt: skip
    values.update(overrides)
    return await make_proxy(**values)


@pytest.fixture
async def kube_setup(
    kube: Any, make_proxy: ProxyFactory, tmp_path: Path, exec_path: str, runner: str,
    http: aiohttp.ClientSession,
) -> KubeSetup:  # fmt: skip
    """A workspace pod on the API test server, and a proxy on the kubernetes backend, on the
    cold or the warm path (then with its pool already full), under the supervisor or the shell."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    settings = {**path_settings(exec_path), **runner_settings(runner, tmp_path)}
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=3, **settings)
    await prewarm(http, proxy, exec_path)
    return KubeSetup(kube, proxy, pod, exec_path, runner)
