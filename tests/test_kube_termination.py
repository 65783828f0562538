"""Through Kubernetes, every early end leaves no process alive in the workspace."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import (
    TOKEN,
    KubeSetup,
    ProxyFactory,
    ProxyProcess,
    exec_events,
    final,
    forking,
    kube_proxy,
    output_of,
    survivors,
    wait_for_processes,
)


async def test_timeout_kills_the_group(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """Past the timeout the group is killed through a second exec; reason timeout, and (the
    early-end rule, as on the local backend) neither the wrapper's 143 nor a signal."""
    events = await exec_events(http, kube_setup.proxy, {"command": forking(marker), "timeout": 1})
    assert final(events)["reason"] == "timeout"
    assert (final(events)["exit_code"], final(events)["signal"]) == (None, None)
    assert await survivors(marker, within=3) == []
    kill_execs = [r for r in kube_setup.api.exec_requests() if "KILL" in str(r.query)]
    assert kill_execs, "the proxy should kill through a second exec"


async def test_term_ignoring_group_gets_kill(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """A group that ignores TERM is killed with KILL after the grace."""
    events = await exec_events(
        http, kube_setup.proxy, {"command": forking(marker, "trap '' TERM; "), "timeout": 1}
    )
    assert final(events)["reason"] == "timeout"
    assert await survivors(marker, within=5) == []


async def test_idle_timeout(http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory,
                            tmp_path: Path, marker: str) -> None:  # fmt: skip
    """A silent command ends with idle_timeout and leaves nothing behind."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path, idle_timeout=1)
    events = await exec_events(http, proxy, {"command": forking(marker, "echo hi; "), "timeout": 60})
    assert output_of(events, "stdout") == b"hi\n"
    assert final(events)["reason"] == "idle_timeout"
    assert await survivors(marker, within=3) == []


async def test_output_limit(http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory,
                           tmp_path: Path, marker: str) -> None:  # fmt: skip
    """Output past the cap is cut exactly there and the group is ended."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path, max_output_bytes=50_000)
    script = f"sleep {marker} & while :; do echo yyyyyyyyyyyyyyyyyyyyyyyyyyyyyy; done"
    events = await exec_events(http, proxy, {"command": ["sh", "-c", script], "timeout": 60})
    assert final(events)["reason"] == "output_limit"
    assert len(output_of(events, "stdout")) == 50_000
    assert await survivors(marker, within=3) == []


async def test_client_disconnect(http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str) -> None:
    """A client that hangs up mid-exec leaves nothing running in the workspace."""
    body = {"command": forking(marker, "echo started; "), "timeout": 60}
    response = await http.post(f"{kube_setup.proxy.url}/exec", json=body)
    assert json.loads(await response.content.readline())["type"] == "start"
    await wait_for_processes(marker, 2)
    response.close()
    assert await survivors(marker) == []


async def test_shutdown(http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str) -> None:
    """Server shutdown past its grace ends execs with reason shutdown and kills their groups."""
    task = asyncio.create_task(
        exec_events(http, kube_setup.proxy, {"command": forking(marker), "timeout": 60})
    )
    await wait_for_processes(marker, 2)
    await kube_setup.proxy.server.stop()
    assert final(await task)["reason"] == "shutdown"
    assert await survivors(marker, within=3) == []


async def test_dead_man_switch_when_the_proxy_is_killed(
    http: aiohttp.ClientSession, kube: Any, spawn_proxy: Callable[..., ProxyProcess],
    tmp_path: Path, marker: str,
) -> None:  # fmt: skip
    """SIGKILL the proxy mid-exec: the stream dies, the wrapper sees stdin EOF and kills the group."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    config = kube.write_kubeconfig(tmp_path / "kc", TOKEN)
    proxy = spawn_proxy("--backend", "kubernetes", "--kubeconfig", str(config), "--namespace", "default",
                        "--session-name", "s1")  # fmt: skip
    response = await http.post(f"{proxy.url}/exec", json={"command": forking(marker), "timeout": 600})
    await response.content.readline()
    await wait_for_processes(marker, 2)
    proxy.process.send_signal(signal.SIGKILL)
    assert await survivors(marker) == []
    response.close()


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
