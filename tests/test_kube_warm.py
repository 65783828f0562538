"""The warm pool's lifecycle, through the real proxy and the Kubernetes API test server.

Every test here waits on events (the pool's state in /status, metrics, the test server's
request log, processes appearing or ending), never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    KubeSetup,
    ProxyFactory,
    RunningProxy,
    eventually,
    exec_events,
    final,
    kube_proxy,
    output_of,
    pod_processes,
    pod_survivors,
    prewarm,
    processes_with,
    wait_for_pool,
    warm_pool_state,
)
from .kube_api_server import Fault

LABELS = {"session": "s1", "type": "workspace"}
warm_only = pytest.mark.parametrize("exec_path", ["warm"])


async def metric(http: aiohttp.ClientSession, proxy: RunningProxy, name: str, **labels: str) -> float:
    """One sample's value from a scrape of /metrics (0 if absent)."""
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def warm_opens(api: Any) -> int:
    return sum("warm_exec=" in r.headers.get("User-Agent", "") for r in api.exec_requests())


async def discarded(http: aiohttp.ClientSession, proxy: RunningProxy, reason: str) -> float:
    return await metric(http, proxy, "session_proxy_warm_execs_discarded_total", reason=reason)


@warm_only
async def test_a_warm_request_opens_no_exec(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """With a full pool a request starts on a warm exec: the start event says warm, the API
    server sees no exec for it, and the start latency is counted under path="warm"."""
    execs_before = len(kube_setup.api.exec_requests())
    events = await exec_events(http, kube_setup.proxy, {"command": ["sh", "-c", "echo warm; exit 7"]})
    assert events[0]["warm"] is True
    assert (output_of(events, "stdout"), final(events)["exit_code"]) == (b"warm\n", 7)
    new = kube_setup.api.exec_requests()[execs_before:]
    assert all("warm_exec=" in r.headers.get("User-Agent", "") for r in new)  # only refills
    count = "session_proxy_exec_start_latency_seconds_count"
    assert await metric(http, kube_setup.proxy, count, path="warm") == 1
    assert await metric(http, kube_setup.proxy, "session_proxy_warm_execs_opened_total") >= 2
    pool = await wait_for_pool(kube_setup.proxy, 2)
    assert (pool["size"], pool["pod"], pool["paused"]) == (2, "ws-1", False)


@warm_only
async def test_pod_replaced_closes_old_warm_execs_unused(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A new pod (another uid) closes the old pod's warm execs, never used: every command then
    runs in the new pod, and nothing of the pool stays running in the old one."""
    old = kube_setup.pod
    old.deleting = True  # terminating: its processes live on, the pod is no longer usable
    new = kube_setup.api.add_pod("ws-2", labels=LABELS)
    deadline = time.monotonic() + 20
    while True:  # the discovery cache runs out within seconds
        events = await exec_events(http, kube_setup.proxy, {"command": ["pwd"]})
        if events[0]["target"] == "default/ws-2/workspace":
            break
        assert time.monotonic() < deadline
    assert events[0]["warm"] is False  # the pool moved to the new pod: nothing warm there yet
    assert await discarded(http, kube_setup.proxy, "pod_replaced") >= 1
    assert await pod_survivors(old.uid) == []
    for _ in range(3):
        await wait_for_pool(kube_setup.proxy, 1)
        events = await exec_events(http, kube_setup.proxy, {"command": ["pwd"]})
        assert (events[0]["warm"], events[0]["target"]) == (True, "default/ws-2/workspace")
        assert output_of(events, "stdout") == f"{new.root}\n".encode()
    assert (await warm_pool_state(kube_setup.proxy))["pod_uid"] == new.uid


async def test_stale_warm_execs_are_replaced(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Past --warm-exec-max-age a warm exec is closed and replaced: new ones are opened, the old
    wrappers end, and a request still starts warm."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, warm_execs=2, warm_exec_max_age=1)
    await prewarm(http, proxy, "warm")

    async def replaced() -> bool:
        return await discarded(http, proxy, "max_age") >= 2 and warm_opens(kube) >= 4

    await eventually(replaced, "two warm execs replaced for age")
    await wait_for_pool(proxy, 1)
    events = await exec_events(http, proxy, {"command": ["true"]})
    assert events[0]["warm"] is True
    assert final(events)["exit_code"] == 0

    async def only_the_pool_left() -> bool:  # the replaced wrappers saw EOF and exited
        return len(pod_processes(pod.uid)) <= 2

    await eventually(only_the_pool_left, "old warm wrappers ended")


async def test_refused_refill_pauses_without_a_hot_loop(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """When the API server refuses execs (403) the pool stops refilling: a few attempts at
    most while requests keep coming, one log line; once execs are allowed again and a request
    finds the pod usable, the pool fills again."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, warm_execs=2)
    await prewarm(http, proxy, "warm")
    kube.forbidden.add(("get", "pods/exec"))
    opens_before = warm_opens(kube)
    for _ in range(8):
        async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
            await response.read()

    async def paused() -> bool:
        return bool((await warm_pool_state(proxy)).get("paused"))

    await eventually(paused, "the pool paused")
    # The refill refusals in the request log: a handful, not a loop (each took a request).
    assert 1 <= warm_opens(kube) - opens_before <= 4
    refused_logs = [r for r in caplog.records if "warm exec refused" in r.getMessage()]
    assert len(refused_logs) == 1
    kube.forbidden.clear()
    deadline = time.monotonic() + 30
    while (await warm_pool_state(proxy)).get("ready", 0) < 2:  # requests bring it back
        assert time.monotonic() < deadline, await warm_pool_state(proxy)
        await exec_events(http, proxy, {"command": ["true"]})
        await asyncio.sleep(0.05)
    assert (await warm_pool_state(proxy))["paused"] is False


@warm_only
async def test_burst_beyond_the_pool_falls_back_to_cold(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """Five commands at once with two warm execs: two start warm, three cold, all run once."""
    gate = kube_setup.pod.root / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.01; done; echo ok # {marker}"
    tasks = [
        asyncio.create_task(exec_events(http, kube_setup.proxy, {"command": ["sh", "-c", script]}))
        for _ in range(5)
    ]
    deadline = time.monotonic() + 20
    while len([p for p in processes_with(marker) if p.name() != "sleep"]) < 5:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    gate.touch()
    results = await asyncio.gather(*tasks)
    assert sorted(events[0]["warm"] for events in results) == [False, False, False, True, True]
    for events in results:
        assert (output_of(events, "stdout"), final(events)["exit_code"]) == (b"ok\n", 0)


@warm_only
async def test_dead_warm_exec_falls_back_without_running_twice(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """The test server drops the warm execs' connections just before a request: it runs on a
    fresh exec, once, and the caller sees an ordinary exit."""
    ran = kube_setup.pod.root / "ran"
    assert kube_setup.api.abort_execs(kube_setup.pod) == 2
    events = await exec_events(
        http, kube_setup.proxy, {"command": ["sh", "-c", f"echo x >> {ran}; echo done"]}
    )
    assert (final(events)["reason"], final(events)["exit_code"]) == ("exited", 0)
    assert output_of(events, "stdout") == b"done\n"
    assert events[0]["warm"] is False
    assert ran.read_text() == "x\n"
    closed = sum([await discarded(http, kube_setup.proxy, r) for r in ("closed", "write_failed")])
    assert closed == 2


async def test_idle_pool_closes_everything(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """After --warm-exec-idle without requests the pool closes every warm exec: the session
    holds no exec and no process in the workspace; the next request opens it again."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, warm_execs=2, warm_exec_idle=2)
    await exec_events(http, proxy, {"command": ["true"]})

    async def closed_for_idle() -> bool:
        return await discarded(http, proxy, "idle") >= 1

    await eventually(closed_for_idle, "the idle close")
    assert (await warm_pool_state(proxy)).get("ready") == 0
    assert await metric(http, proxy, "session_proxy_warm_execs") == 0
    assert await pod_survivors(pod.uid) == []
    await exec_events(http, proxy, {"command": ["true"]})
    await wait_for_pool(proxy, 1)


async def test_quiet_warm_exec_is_discarded(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A warm exec whose peer stops answering pings is discarded as silent, not handed out."""
    kube.add_pod("ws-1", labels=LABELS)
    kube.faults.append(Fault(path="/exec", ignore_pings=True, times=-1))
    proxy = await kube_proxy(
        kube, make_proxy, tmp_path, warm_execs=1, exec_ping_interval=0.1, exec_ping_timeout=0.5
    )
    await exec_events(http, proxy, {"command": ["true"]})

    async def silent() -> bool:
        return await discarded(http, proxy, "silent") >= 1

    await eventually(silent, "a silent warm exec discarded")


def test_bad_pool_settings_are_refused() -> None:
    """A negative pool size or a zero max age stops start-up with a line naming the setting."""
    for flags in (["--warm-execs", "-1"], ["--warm-exec-max-age", "0"]):
        result = subprocess.run(
            [sys.executable, "-m", "session_proxy", "serve", "--backend", "local", *flags],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode != 0
        assert flags[0] in result.stderr, result.stderr


@warm_only
async def test_shutdown_closes_the_pool_and_its_tasks(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """Stopping the server closes every warm exec (counted as shutdown) and leaves no pool task
    (keeper, watchers, pings) running, and no waiting wrapper in the workspace."""
    await kube_setup.proxy.server.stop()
    prefixes = ("warm-", "exec-ping")
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(prefixes)] == []
    assert await pod_survivors(kube_setup.pod.uid) == []
