"""A request's timeout bounds all of it on Kubernetes: the wait for the pod and the image probe too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import (
    ProxyFactory,
    RunningProxy,
    exec_events,
    final,
    image_without_setsid,
    kube_proxy,
    output_of,
)
from .kube_api_server import Fault

LABELS = {"session": "s1", "type": "workspace"}


async def answer(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: dict[str, Any]
) -> tuple[int, str, Any]:
    """Status, content type and JSON body of a request refused before streaming."""
    async with http.post(f"{proxy.url}/exec", json=body) as response:
        return response.status, response.headers["Content-Type"], await response.json(content_type=None)


async def test_timeout_bounds_the_wait_for_the_workspace(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """With a pod that never gets ready and a 60 s --workspace-wait, a request with timeout 2
    ends at its own deadline, saying so, and nothing is exec'd."""
    kube.add_pod("ws-1", labels=LABELS, ready=False)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=60)
    events = await asyncio.wait_for(exec_events(http, proxy, {"command": ["true"], "timeout": 2}), timeout=20)
    assert events[0]["type"] == "waiting"
    assert final(events)["reason"] == "error"
    assert "timeout (2 s) ran out" in final(events)["message"]
    assert "not Ready" in final(events)["message"]
    assert kube.exec_requests() == []


async def test_pod_ready_after_the_deadline_gets_no_command(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A pod that becomes ready only after the request's deadline never gets its command."""
    pod = kube.add_pod("ws-1", labels=LABELS, ready=False)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=60)
    task = asyncio.create_task(exec_events(http, proxy, {"command": ["echo", "late"], "timeout": 1}))
    await asyncio.wait({task}, timeout=10)  # over at its deadline; without the bound it waits on
    pod.ready = True
    events = await task
    assert final(events)["reason"] == "error"
    assert output_of(events, "stdout") == b""
    assert kube.exec_requests() == []


async def test_waiting_events_repeat_while_the_wait_lasts(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """While the pod stays unready, `waiting` events keep coming (at least every 5 s), even
    though the reason does not change."""
    kube.add_pod("ws-1", labels=LABELS, ready=False)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=60)
    events = await exec_events(http, proxy, {"command": ["true"], "timeout": 7})
    waiting = [e for e in events if e["type"] == "waiting"]
    assert len(waiting) >= 2, events
    assert len({e["message"] for e in waiting}) == 1


async def test_hung_image_probe_is_bounded_by_the_request_timeout(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An image probe whose stream never ends is cut at the request's deadline with a JSON
    error (not 504 text/plain after 30 s); nothing is cached, so the next request probes again."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    kube.faults.append(Fault(path="/exec", stall=True, times=1))
    status, content_type, body = await asyncio.wait_for(
        answer(http, proxy, {"command": ["true"], "timeout": 2}), timeout=20
    )
    assert (status, content_type) == (503, "application/json; charset=utf-8")
    assert body["error"]["code"] == "workspace_not_ready"
    assert "probe" in body["error"]["message"]
    events = await exec_events(http, proxy, {"command": ["echo", "probed again"]})
    assert events[0]["guarantees"]["kill"] is True
    assert output_of(events, "stdout") == b"probed again\n"


async def test_hung_probe_after_waiting_ends_with_an_exit_event(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Once `waiting` events went out, a probe that hangs past the request's deadline ends the
    stream with one `exit` event (reason error, saying why), not a cut connection."""
    pod = kube.add_pod("ws-1", labels=LABELS, ready=False)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=60)
    kube.faults.append(Fault(path="/exec", stall=True, times=1))
    events: list[dict[str, Any]] = []
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"], "timeout": 3}) as response:
        async for line in response.content:
            events.append(json.loads(line))
            if events[-1]["type"] == "waiting":
                pod.ready = True
    assert events[0]["type"] == "waiting"
    assert final(events)["reason"] == "error"
    assert "probe" in final(events)["message"]


async def test_inconclusive_probe_is_not_cached(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A probe stream that drops without a status is an error, not "every tool present": the
    next request probes again and learns that the image lacks setsid."""
    kube.add_pod("ws-1", labels=LABELS, path=image_without_setsid(tmp_path))
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    kube.faults.append(Fault(path="/exec", drop_after_bytes=0, times=1))
    status, _, body = await answer(http, proxy, {"command": ["true"]})
    assert (status, body["error"]["code"]) == (502, "backend_error")
    assert "without a status" in body["error"]["message"]
    events = await exec_events(http, proxy, {"command": ["echo", "hi"]})
    assert events[0]["guarantees"] == {
        "workdir": True, "env": True, "stdin": True, "kill": False, "runner": "shell"
    }  # fmt: skip
