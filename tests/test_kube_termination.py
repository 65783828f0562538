"""Through Kubernetes, every early end leaves no process alive in the workspace."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import (
    TOKEN,
    KubeSetup,
    ProxyFactory,
    ProxyProcess,
    check_path,
    exec_events,
    final,
    forking,
    kube_exec,
    kube_proxy,
    output_of,
    path_settings,
    pod_processes,
    pod_survivors,
    prewarm,
    runner_settings,
    survivors,
    wait_for_pool,
    wait_for_processes,
)
from .conftest import KubeSetup as Setup
from .kube_api_server import Fault


def kill_execs(api: Any, exec_id: str) -> list[Any]:
    """The kill execs the proxy made for one exec, known by the User-Agent it gives them."""
    agent = f"exec_id={exec_id}-kill"
    return [r for r in api.exec_requests() if r.headers.get("User-Agent", "").endswith(agent)]


async def test_timeout_kills_the_group(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """Past the timeout the group is killed, by the shell wrapper through a second exec, by the
    supervisor on its own stream's request with no second exec; reason timeout, and (the
    early-end rule, as on the local backend) neither the wrapper's 143 nor a signal."""
    events = await kube_exec(http, kube_setup, {"command": forking(marker), "timeout": 1})
    assert final(events)["reason"] == "timeout"
    assert (final(events)["exit_code"], final(events)["signal"]) == (None, None)
    assert await survivors(marker, within=3) == []
    second_exec = bool(kill_execs(kube_setup.api, events[0]["exec_id"]))
    assert second_exec is (kube_setup.runner == "shell")


@pytest.mark.parametrize("shell", ["dash", "bash", "busybox sh"])
async def test_term_ignoring_group_gets_kill_from_the_kill_exec(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str,
    shell: str,
) -> None:  # fmt: skip
    """A group that ignores TERM is killed with KILL after the grace by the kill exec alone:
    the exec's stdin stays open after the proxy leaves, so the dead-man switch cannot fire,
    and the backstop deadline is a minute away."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"}, shell=shell)
    kube.keep_stdin_open = True
    proxy = await kube_proxy(kube, make_proxy, tmp_path, idle_timeout=1)
    body = {"command": forking(marker, "trap '' TERM; "), "timeout": 60}
    events = await exec_events(http, proxy, body)
    assert final(events)["reason"] == "idle_timeout"
    assert await survivors(marker, within=5) == []
    assert kill_execs(kube, events[0]["exec_id"])


async def test_term_ignoring_group_gets_kill_from_the_supervisor(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """Under the supervisor a group that ignores TERM gets KILL after the grace from the end
    request on the exec's own stream: no second exec, and no dead-man switch (the exec's stdin
    stays open after the proxy leaves)."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    kube.keep_stdin_open = True
    proxy = await kube_proxy(
        kube, make_proxy, tmp_path, idle_timeout=1, **runner_settings("supervisor", tmp_path)
    )
    body = {"command": forking(marker, "trap '' TERM; "), "timeout": 60}
    events = await exec_events(http, proxy, body)
    assert events[0]["guarantees"]["runner"] == "supervisor"
    assert final(events)["reason"] == "idle_timeout"
    assert await survivors(marker, within=5) == []
    assert not kill_execs(kube, events[0]["exec_id"])


async def test_dead_man_switch_alone_ends_the_group(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """With every kill exec failing, a client that hangs up still leaves nothing running: the
    wrapper (or supervisor) sees its stdin close and ends the group itself (the backstop is a
    minute away)."""
    kube_setup.api.faults.append(Fault("/exec", status=500, times=-1, user_agent="-kill"))
    # "up" goes to stderr after the group report on the same pipe: once the proxy forwards it,
    # it knows the group, so its end task will try the kill exec.
    command = forking(marker, before="echo up >&2; ")
    response = await http.post(f"{kube_setup.proxy.url}/exec", json={"command": command, "timeout": 60})
    start = json.loads(await response.content.readline())
    while json.loads(await response.content.readline())["type"] != "stderr":
        pass
    await wait_for_processes(marker, 2)
    response.close()
    assert await survivors(marker, within=20) == []
    if kube_setup.runner == "supervisor":
        return  # it makes no kill exec
    # The kill exec is made by the exec's end task, which may still be on its way when the
    # dead-man switch alone has ended the group. Wait for it in the request log.
    deadline = asyncio.get_running_loop().time() + 20
    while not kill_execs(kube_setup.api, start["exec_id"]) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert kill_execs(kube_setup.api, start["exec_id"]), "a kill exec was tried (and refused)"


async def test_idle_timeout(http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory,
                            tmp_path: Path, marker: str, exec_path: str) -> None:  # fmt: skip
    """A silent command ends with idle_timeout and leaves nothing behind."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path, idle_timeout=1, **path_settings(exec_path))
    await prewarm(http, proxy, exec_path)
    events = await kube_exec(http, Setup(kube, proxy, pod, exec_path),
                             {"command": forking(marker, "echo hi; "), "timeout": 60})  # fmt: skip
    assert output_of(events, "stdout") == b"hi\n"
    assert final(events)["reason"] == "idle_timeout"
    assert await survivors(marker, within=3) == []


async def test_output_limit(http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory,
                           tmp_path: Path, marker: str, exec_path: str) -> None:  # fmt: skip
    """Output past the cap is cut exactly there and the group is ended."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path, max_output_bytes=50_000, **path_settings(exec_path))
    await prewarm(http, proxy, exec_path)
    script = f"sleep {marker} & while :; do echo yyyyyyyyyyyyyyyyyyyyyyyyyyyyyy; done"
    events = await kube_exec(http, Setup(kube, proxy, pod, exec_path),
                             {"command": ["sh", "-c", script], "timeout": 60})  # fmt: skip
    assert final(events)["reason"] == "output_limit"
    assert len(output_of(events, "stdout")) == 50_000
    assert await survivors(marker, within=3) == []


async def test_client_disconnect(http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str) -> None:
    """A client that hangs up mid-exec leaves nothing running in the workspace."""
    body = {"command": forking(marker, "echo started; "), "timeout": 60}
    if kube_setup.path == "warm":
        await wait_for_pool(kube_setup.proxy, 1)
    response = await http.post(f"{kube_setup.proxy.url}/exec", json=body)
    start = json.loads(await response.content.readline())
    assert start["type"] == "start"
    check_path(kube_setup, [start])
    await wait_for_processes(marker, 2)
    response.close()
    assert await survivors(marker) == []


async def test_shutdown(http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str) -> None:
    """Server shutdown past its grace ends execs with reason shutdown and kills their groups."""
    task = asyncio.create_task(kube_exec(http, kube_setup, {"command": forking(marker), "timeout": 60}))
    await wait_for_processes(marker, 2)
    await kube_setup.proxy.server.stop()
    assert final(await task)["reason"] == "shutdown"
    assert await survivors(marker, within=3) == []


async def test_dead_man_switch_when_the_proxy_is_killed(
    http: aiohttp.ClientSession, kube: Any, spawn_proxy: Callable[..., ProxyProcess],
    tmp_path: Path, marker: str, exec_path: str,
) -> None:  # fmt: skip
    """SIGKILL the proxy mid-exec: the stream dies, the wrapper sees stdin EOF and kills the
    group; on the warm path the idle warm exec beside it ends too: nothing of the pod's is left."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    config = kube.write_kubeconfig(tmp_path / "kc", TOKEN)
    warm_execs = str(path_settings(exec_path)["warm_execs"])
    proxy = spawn_proxy("--backend", "kubernetes", "--kubeconfig", str(config), "--namespace", "default",
                        "--session-name", "s1", "--warm-execs", warm_execs)  # fmt: skip
    running = _running(proxy)
    await prewarm(http, running, exec_path)
    response = await http.post(f"{proxy.url}/exec", json={"command": forking(marker), "timeout": 600})
    start = json.loads(await response.content.readline())
    assert start["warm"] is (exec_path == "warm")
    await wait_for_processes(marker, 2)
    if exec_path == "warm":
        await wait_for_pool(running, 1)  # one waits beside the command (its replacement after it)
    proxy.process.send_signal(signal.SIGKILL)
    assert await survivors(marker) == []
    assert await pod_survivors(pod.uid) == []
    response.close()


async def test_dead_man_switch_for_idle_warm_execs(
    http: aiohttp.ClientSession, kube: Any, spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:  # fmt: skip
    """SIGKILL the proxy while only warm execs wait for a header: each wrapper's read sees EOF
    and it exits; no process of the pod stays running."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    config = kube.write_kubeconfig(tmp_path / "kc", TOKEN)
    proxy = spawn_proxy("--backend", "kubernetes", "--kubeconfig", str(config), "--namespace", "default",
                        "--session-name", "s1", "--warm-execs", "3")  # fmt: skip
    await exec_events(http, _running(proxy), {"command": ["true"]})
    await wait_for_pool(_running(proxy), 3)
    assert len(pod_processes(pod.uid)) >= 3  # the waiting wrappers
    proxy.process.send_signal(signal.SIGKILL)
    assert await pod_survivors(pod.uid) == []


async def test_large_output_with_slow_reader_keeps_memory_bounded(
    http: aiohttp.ClientSession, kube: Any, spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """200 MB through the WebSocket to a reader that pauses: the proxy's RSS stays flat and
    every byte arrives (the proxy stops reading the WebSocket while the client is slow)."""
    import psutil

    mib = 1024 * 1024
    size = 200 * mib
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    config = kube.write_kubeconfig(tmp_path / "kc", TOKEN)
    proxy = spawn_proxy("--backend", "kubernetes", "--kubeconfig", str(config), "--namespace", "default",
                        "--session-name", "s1", "--max-output-bytes", str(size * 2))  # fmt: skip
    rss = psutil.Process(proxy.process.pid).memory_info
    await exec_events(http, _running(proxy), {"command": ["true"]})  # warm up: probe, TLS, pools
    baseline = rss().rss
    body = {"command": ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' 'k'"], "timeout": 300}
    received = 0
    async with http.post(f"{proxy.url}/exec", json=body) as response:
        await response.content.readline()
        await asyncio.sleep(2)  # not reading: everything upstream must stall
        paused = rss().rss
        peak = paused
        async for chunk in response.content.iter_chunked(1024 * 1024):
            received += chunk.count(b"k")
            if received % (16 * mib) < mib:
                peak = max(peak, rss().rss)
    print(f"kube rss baseline={baseline // mib}MiB paused={paused // mib}MiB peak={peak // mib}MiB")
    assert received == size
    assert paused - baseline < 20 * mib, (baseline, paused)
    assert peak - baseline < 40 * mib, (baseline, peak)


def _running(proxy: ProxyProcess) -> Any:
    from .conftest import RunningProxy

    return RunningProxy(server=None, url=proxy.url, ops_url=proxy.ops_url)  # type: ignore[arg-type]
