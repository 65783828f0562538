"""The instants around a command's start: a request that ends there leaves nothing untracked.

A command is either never started or tracked until its end: terminated on every early end,
its slot held until then, its log line and metrics written. Each test puts the end of the
request (a hang-up, a stop) at one exact instant of the start, chosen by a backend that holds
the start there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_proxy.backends.base import ExecSpec, WaitingCallback
from session_proxy.backends.local import LocalBackend
from session_proxy.keys import ADMISSION, SUPERVISOR

from .conftest import ProxyFactory, RunningProxy, forking, kube_proxy, survivors
from .kube_api_server import Fault

pytestmark = pytest.mark.timeout(60)
LABELS = {"session": "s1", "type": "workspace"}


class HangUpAsStartedBackend(LocalBackend):
    """The local backend, whose start, once the command runs, has the request cancelled (as
    aiohttp does when its client hangs up) in the same loop turn as the start's own result
    arrives: the request learns of the hang-up before it has taken the execution."""

    def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> Any:
        handler = asyncio.current_task()  # ``start`` is called (not awaited) in the request's task
        assert handler is not None
        return self._start_then_hang_up(spec, on_waiting, handler)

    async def _start_then_hang_up(
        self, spec: ExecSpec, on_waiting: WaitingCallback, handler: asyncio.Task[Any]
    ) -> Any:
        execution = await super().start(spec, on_waiting)
        # Scheduled before the start's result is passed on: the cancel lands in between.
        asyncio.get_running_loop().call_soon(handler.cancel)
        return execution


async def metrics_text(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        return await response.text()


async def test_hang_up_as_the_start_finishes_ends_the_command(
    http: aiohttp.ClientSession,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    marker: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hang-up that arrives after the backend started the command but before the request
    took it: the command is ended, its slot comes back only then, and it is logged and counted
    once as client_gone (in flight 0 again)."""
    caplog.set_level(logging.INFO, logger="session_proxy.streaming")
    proxy = await make_proxy(exec_backend=HangUpAsStartedBackend(tmp_path), max_concurrent=1)
    with pytest.raises(aiohttp.ClientError):  # the request was cancelled: no answer
        async with http.post(f"{proxy.url}/exec", json={"command": forking(marker)}) as response:
            await response.read()
    assert await survivors(marker) == []
    app = proxy.server.exec_app
    while app[ADMISSION].active or app[SUPERVISOR].in_flight:
        await asyncio.sleep(0.01)
    metrics = await metrics_text(http, proxy)
    assert 'session_proxy_exec_requests_total{outcome="client_gone"} 1.0' in metrics
    assert "session_proxy_exec_in_flight 0.0" in metrics
    lines = [r for r in caplog.records if r.getMessage() == "exec finished"]
    assert [getattr(r, "outcome", None) for r in lines] == ["client_gone"]


async def test_stop_after_the_wait_lets_the_start_finish_and_ends_the_command(
    kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """A request that waited for the pod (a ``waiting`` event) and is now probing the image
    is not cancelled by a drain: the start runs to its end, the command is ended at once, and
    the client learns it started (``start``, then ``exit`` with reason shutdown)."""
    pod = kube.add_pod("ws-1", labels=LABELS, phase="Pending", ready=False, container_running=False)
    probe_held = asyncio.Event()
    kube.faults.append(Fault(path="/exec", user_agent="-probe", hold=probe_held))
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=20, shutdown_grace=30)
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{proxy.url}/exec", json={"command": forking(marker)})
        assert response.status == 200
        events.append(json.loads(await response.content.readline()))
        assert events[0]["type"] == "waiting"
        pod.phase, pod.ready, pod.container_running = "Running", True, True
        while not any(r.headers.get("User-Agent", "").endswith("-probe") for r in kube.exec_requests()):
            await asyncio.sleep(0.01)  # the wait is over; the probe is held by the test server
        stopping = asyncio.create_task(proxy.server.stop())
        while not proxy.server.exec_app[SUPERVISOR].draining:
            await asyncio.sleep(0.01)
        probe_held.set()
        events += [json.loads(line) async for line in response.content]
        response.close()
    await stopping
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["start", "exit"], events
    assert events[-1]["reason"] == "shutdown"
    assert await survivors(marker) == []
