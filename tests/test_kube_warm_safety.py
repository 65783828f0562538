"""The warm pool hands out only live warm execs and loses none: a request that ends while it
takes one (cancelled), a peer gone silent, a pod re-created under the same name, credentials
that changed or were refused, an unexpected error while refilling.

The first tests drive a ``WarmPool`` directly (opened through the real API client against the
Kubernetes API test server), to put a cancel at an exact point of a take; the others go
through the real proxy.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_proxy.backends.kubernetes.api import KubeApi
from session_proxy.backends.kubernetes.discovery import Workspace, WorkspaceLocator
from session_proxy.backends.kubernetes.exec_stream import ExecStream
from session_proxy.backends.kubernetes.warm_pool import WarmPool
from session_proxy.backends.kubernetes.wrapper import SHELL, WRAPPER_SCRIPT
from session_proxy.metrics import Metrics
from session_proxy.settings import Settings

from .conftest import (
    TOKEN,
    ProxyFactory,
    RunningProxy,
    eventually,
    exec_events,
    final,
    kube_proxy,
    output_of,
    pod_survivors,
    wait_for_pool,
    warm_pool_state,
)
from .kube_api_server import Fault
from .test_kube_discovery import in_cluster  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)
LABELS = {"session": "s1", "type": "workspace"}


def discarded_count(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("session_proxy_warm_execs_discarded_total", {"reason": reason})
    return value or 0.0


async def proxy_discarded(http: aiohttp.ClientSession, proxy: RunningProxy, reason: str) -> float:
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        text = await response.text()
    prefix = f'session_proxy_warm_execs_discarded_total{{reason="{reason}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


@dataclass
class PoolRig:
    pool: WarmPool
    workspace: Workspace
    metrics: Metrics
    pod: Any
    settings: Settings
    open_warm: Callable[[Workspace, str], Awaitable[ExecStream]]
    opened: list[ExecStream] = field(default_factory=list)
    failing_opens: int = 0  # the next opens fail with an error that is not the API's refusal


async def no_wait(message: str) -> None:
    raise AssertionError(f"the pod is ready; nothing to wait for: {message}")


@pytest.fixture
async def rig(kube: Any, tmp_path: Path) -> AsyncIterator[PoolRig]:
    """A warm pool of one, its opener the real API client's exec, bound to a ready pod."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    config = kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN)
    settings = Settings.model_validate({
        "backend": "kubernetes", "kubeconfig": str(config), "namespace": "default",
        "session_name": "s1", "warm_execs": 1,
    })  # fmt: skip
    api = KubeApi(settings, lambda kind: None, lambda verb, seconds: None)
    await api.open()
    locator = WorkspaceLocator(api, settings)
    found = await locator.find(no_wait, asyncio.get_running_loop().time() + 10)
    assert isinstance(found, Workspace)
    metrics = Metrics()
    opened: list[ExecStream] = []
    rig: PoolRig

    async def open_warm(workspace: Workspace, warm_id: str) -> ExecStream:
        if rig.failing_opens:
            rig.failing_opens -= 1
            raise RuntimeError("an unexpected failure")
        argv = [SHELL, "-c", WRAPPER_SCRIPT]
        url = api.exec_url(workspace.namespace, workspace.name, workspace.container, argv, stdin=True)
        stream = await api.open_exec(url, f"session-proxy/test warm_exec={warm_id}")
        opened.append(stream)
        return stream

    pool = WarmPool(settings, metrics, open_warm)
    rig = PoolRig(pool, found, metrics, pod, settings, open_warm, opened)
    try:
        yield rig
    finally:
        await pool.close()
        await api.close()


async def filled(rig: PoolRig) -> None:
    """Bind the pool (the first take finds it empty) and wait until it holds its warm exec."""
    assert await rig.pool.take(rig.workspace, b"", "first") is None

    async def ready() -> bool:
        return rig.pool.describe()["ready"] == 1

    await eventually(ready, "the pool filled")


def pool_tasks() -> list[str]:
    prefixes = ("warm-", "exec-ping")
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(prefixes)]


async def test_a_take_cancelled_while_the_watcher_ends_is_cancelled(rig: PoolRig, api_mode: str) -> None:
    """A request cancelled while the pool stops the warm exec's watcher is cancelled (the take
    does not go on to write its header) and the warm exec is closed, counted as abandoned."""
    await filled(rig)
    take = asyncio.create_task(rig.pool.take(rig.workspace, b"header", "cancelled"))
    await asyncio.sleep(0)  # one step: the take now waits for the watcher to end
    take.cancel()
    with pytest.raises(asyncio.CancelledError):
        await take
    assert discarded_count(rig.metrics, "abandoned") == 1
    await rig.pool.close()
    assert pool_tasks() == []
    assert await pod_survivors(rig.pod.uid) == []


async def test_a_header_write_cancelled_closes_the_warm_exec(rig: PoolRig, api_mode: str) -> None:
    """A request cancelled while its header is being written (the socket's buffer is full) does
    not leak the warm exec: it is closed (stdin EOF ends whatever the wrapper started), counted
    as abandoned, and nothing of it (its pinger, its wrapper) outlives the pool."""
    await filled(rig)
    # Over the client writer's 256 KiB limit even compressed, so writing it waits for a drain;
    # one unfinished line, so the wrapper keeps reading instead of refusing it and ending the
    # stream (the frames before the limit do go out).
    header = secrets.token_urlsafe(600 * 1024).encode()
    protocol = rig.opened[0]._ws._writer.protocol  # the connection's flow control, as a full socket sets it
    protocol.pause_writing()
    take = asyncio.create_task(rig.pool.take(rig.workspace, header, "cut-short"))
    while protocol._drain_waiter is None:  # the liveness ping went out; the header waits to drain
        assert not take.done(), take
        await asyncio.sleep(0.01)
    take.cancel()
    with pytest.raises(asyncio.CancelledError):
        await take
    assert discarded_count(rig.metrics, "abandoned") == 1
    protocol.resume_writing()  # the socket drains again: the close can go out
    await rig.pool.close()
    assert pool_tasks() == []
    assert await pod_survivors(rig.pod.uid) == []


async def test_the_keeper_survives_an_unexpected_error(
    rig: PoolRig, api_mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An error other than the API's refusal while opening a warm exec is logged, and the pool
    goes on filling after the backoff, without waiting for another request."""
    rig.failing_opens = 1
    await filled(rig)
    assert rig.failing_opens == 0
    assert any(r.getMessage() == "warm exec open failed" and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("fresh", [3600.0, 0.0])
async def test_a_warm_exec_heard_from_recently_is_used_without_a_ping(
    kube: Any, rig: PoolRig, api_mode: str, fresh: float
) -> None:
    """Within --warm-exec-fresh of its open a warm exec is handed out as it is, with no ping
    (its peer here answers none: a ping would find it silent); with 0 it is pinged first."""
    await rig.pool.close()
    kube.faults.append(Fault(path="/exec", user_agent="warm_exec=", ignore_pings=True, times=-1))
    settings = rig.settings.model_copy(update={"warm_exec_fresh": fresh})
    pool = WarmPool(settings, rig.metrics, rig.open_warm)
    try:
        assert await pool.take(rig.workspace, b"", "first") is None  # binds the pool

        async def ready() -> bool:
            return pool.describe()["ready"] == 1

        await eventually(ready, "the pool filled")
        taken = await pool.take(rig.workspace, b"", "second")
        assert (taken is not None, discarded_count(rig.metrics, "silent")) == (fresh > 0, float(fresh == 0))
        if taken is not None:
            await taken.close()
    finally:
        await pool.close()


# ---- through the proxy --------------------------------------------------------------------


async def test_a_silent_warm_exec_is_not_handed_out(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A warm exec whose peer went silent without a reset (nothing answered, pings included)
    is found out before the header by an unanswered ping: the command runs on a new exec, once,
    and the warm exec is discarded as silent."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    kube.faults.append(Fault(path="/exec", user_agent="warm_exec=", stall=True, ignore_pings=True, times=-1))
    settings = {"warm_execs": 1, "exec_ping_interval": 5, "exec_ping_timeout": 20, "warm_exec_fresh": 0}
    proxy = await kube_proxy(kube, make_proxy, tmp_path, **settings)
    await exec_events(http, proxy, {"command": ["true"]})  # opens the pool
    await wait_for_pool(proxy, 1)
    ran = pod.root / "ran"
    events = await exec_events(http, proxy, {"command": ["sh", "-c", f"echo x >> {ran}; echo done"]})
    assert (final(events)["reason"], final(events)["exit_code"]) == ("exited", 0)
    assert (events[0]["warm"], output_of(events, "stdout")) == (False, b"done\n")
    assert ran.read_text() == "x\n"
    assert await proxy_discarded(http, proxy, "silent") >= 1


async def test_a_pod_recreated_under_the_same_name_unbinds_the_pool(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The pod is deleted and created again with the same name: a warm exec the pool opens by
    that name lands in the new pod, so the pool, bound to the old uid, lets it go (pod_replaced)
    instead of offering it as the old pod's; requests then run in the new pod."""
    old = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, warm_execs=2)
    await exec_events(http, proxy, {"command": ["true"]})
    await wait_for_pool(proxy, 2)
    kube.delete_pod("ws-1")  # its wrappers die: the pool reopens by name after a backoff
    new = kube.add_pod("ws-1", labels=LABELS)

    async def let_go() -> bool:
        return await proxy_discarded(http, proxy, "pod_replaced") >= 1

    await eventually(let_go, "the pool let go of the old uid")
    state = await warm_pool_state(proxy)
    assert state["pod_uid"] != old.uid or state["ready"] == 0, state
    deadline = time.monotonic() + 20
    while True:  # the discovery cache runs out within seconds
        events = await exec_events(http, proxy, {"command": ["pwd"]})
        if output_of(events, "stdout") == f"{new.root}\n".encode():
            break
        assert time.monotonic() < deadline, events
    assert (await warm_pool_state(proxy))["pod_uid"] in (None, new.uid)


async def test_a_refused_call_closes_the_warm_execs(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Any API call answered 403 (here, reading the pod's log) closes every warm exec: they
    were opened with rights the token may no longer have."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, warm_execs=2)
    await exec_events(http, proxy, {"command": ["true"]})
    await wait_for_pool(proxy, 2)
    kube.forbidden.add(("get", "pods/log"))
    async with http.get(f"{proxy.url}/logs") as response:
        assert response.status != 200
    assert await proxy_discarded(http, proxy, "credentials") == 2
    assert len(await pod_survivors(pod.uid, within=10)) <= 2  # only refills wait in the pod


async def test_a_changed_token_closes_the_warm_execs(
    http: aiohttp.ClientSession,
    kube: Any,
    make_proxy: ProxyFactory,
    in_cluster: dict[str, Any],  # noqa: F811
) -> None:
    """The token file holds another token (rotated, or re-issued with other rights): the warm
    execs opened with the old one are closed; the pool refills with the new one."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await make_proxy(**{**in_cluster, "warm_execs": 2})
    await exec_events(http, proxy, {"command": ["true"]})
    await wait_for_pool(proxy, 2)
    Path(in_cluster["token_file"]).write_text("token-b-rotated\n")
    kube.tokens.clear()
    kube.add_token("token-b-rotated")
    async with http.get(f"{proxy.url}/status") as response:  # a call: 401, the file is read again
        assert response.status == 200
    assert await proxy_discarded(http, proxy, "credentials") == 2
    await wait_for_pool(proxy, 1)
    events = await exec_events(http, proxy, {"command": ["echo", "after"]})
    assert output_of(events, "stdout") == b"after\n"


async def test_logs_then_a_warm_request_still_work(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Reading the log (allowed) leaves the pool alone: the next request starts warm."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, warm_execs=1)
    await exec_events(http, proxy, {"command": ["true"]})
    await wait_for_pool(proxy, 1)
    async with http.get(f"{proxy.url}/logs") as response:
        assert response.status == 200
    events = await exec_events(http, proxy, {"command": ["true"]})
    assert events[0]["warm"] is True
    assert await proxy_discarded(http, proxy, "credentials") == 0
