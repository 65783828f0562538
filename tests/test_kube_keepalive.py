"""Exec streams are kept alive with pings: quiet commands survive idle cutters, dead peers are found."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import ProxyFactory, exec_events, final, kube_proxy, output_of, survivors
from .kube_api_server import Fault

LABELS = {"session": "s1", "type": "workspace"}
IDLE_CUT = 1.5  # seconds without a frame either way before the "load balancer" cuts


async def test_quiet_command_outlives_an_idle_cutter(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A command silent for 3 x the idle cut completes, because pings keep its stream busy; the
    same command through a proxy that pings too rarely is cut (transport_lost): the fault bites."""
    kube.add_pod("ws-1", labels=LABELS)
    kube.faults.append(Fault(path="/exec", idle_cut=IDLE_CUT, times=-1))
    script = ["sh", "-c", f"sleep {3 * IDLE_CUT}; echo done"]
    pinging = await kube_proxy(kube, make_proxy, tmp_path, exec_ping_interval=0.1)
    events = await exec_events(http, pinging, {"command": script, "timeout": 30})
    assert (final(events)["reason"], final(events)["exit_code"]) == ("exited", 0)
    assert output_of(events, "stdout") == b"done\n"
    rare = await kube_proxy(kube, make_proxy, tmp_path, exec_ping_interval=20, exec_ping_timeout=40)
    events = await exec_events(http, rare, {"command": script, "timeout": 30})
    assert final(events)["reason"] == "transport_lost", final(events)


async def test_silent_peer_is_transport_lost_and_frees_its_slot(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """A peer that stops answering pings ends the exec as transport_lost within the ping
    window (long before the timeout), the command is ended, and the only slot is free again."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(
        kube, make_proxy, tmp_path, exec_ping_interval=0.2, exec_ping_timeout=1.5, max_concurrent=1
    )
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0  # probe done
    kube.faults.append(Fault(path="/exec", ignore_pings=True, times=1))
    body = {"command": ["sleep", marker], "timeout": 120}
    events = await asyncio.wait_for(exec_events(http, proxy, body), timeout=40)
    exit_event = final(events)
    assert (exit_event["reason"], exit_event["exit_code"]) == ("transport_lost", None)
    assert "stopped answering pings" in exit_event["message"]
    assert await survivors(marker) == []
    events = await exec_events(http, proxy, {"command": ["echo", "slot free"]})
    assert output_of(events, "stdout") == b"slot free\n"


async def test_oversized_frame_is_refused_not_buffered(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """A single WebSocket frame over the 1 MiB bound ends the exec (transport_lost, saying why)
    instead of being taken into memory whole; the command is still ended."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0  # probe done
    kube.faults.append(Fault(path="/exec", frame_bytes=4 * 1024 * 1024, times=1))
    events = await exec_events(http, proxy, {"command": ["sleep", marker], "timeout": 60})
    exit_event = final(events)
    assert exit_event["reason"] == "transport_lost", exit_event
    assert "size limit" in exit_event["message"]
    assert output_of(events, "stdout") == b""
    assert await survivors(marker) == []
