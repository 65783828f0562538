"""Every early end terminates the command and everything it started, and says why."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from session_proxy.backends.base import ExecSpec, WaitingCallback
from session_proxy.backends.local import LocalBackend
from session_proxy.exec_command import exit_code_for
from session_proxy.keys import ADMISSION, SUPERVISOR
from session_proxy.models import ExitEvent

from .conftest import (
    ProxyFactory,
    RunningProxy,
    exec_events,
    final,
    forking,
    kube_proxy,
    output_of,
    survivors,
    wait_for_processes,
)


async def test_timeout_ends_the_whole_group(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """A command past its timeout ends with reason timeout, and no process of it survives.

    An early end reports neither exit code nor signal (the README's rule, same on every backend).
    """
    events = await exec_events(http, proxy, {"command": forking(marker), "timeout": 0.5})
    exit_event = final(events)
    assert exit_event["reason"] == "timeout"
    assert exit_event["exit_code"] is None
    assert exit_event["signal"] is None
    assert await survivors(marker, within=0) == []


async def test_idle_timeout_ends_a_silent_command(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """No output for idle_timeout seconds ends the command (reason idle_timeout); output first."""
    proxy = await make_proxy(idle_timeout=0.5)
    events = await exec_events(http, proxy, {"command": forking(marker, "echo started; "), "timeout": 30})
    assert output_of(events, "stdout") == b"started\n"
    assert final(events)["reason"] == "idle_timeout"
    assert await survivors(marker, within=0) == []


async def test_idle_timer_restarts_on_output(http: aiohttp.ClientSession, make_proxy: ProxyFactory) -> None:
    """A command that keeps talking more often than the idle timeout is not ended by it."""
    proxy = await make_proxy(idle_timeout=1)
    script = "for i in 1 2 3 4 5 6; do echo $i; sleep 0.3; done"
    events = await exec_events(http, proxy, {"command": ["sh", "-c", script]})
    assert final(events)["reason"] == "exited"
    assert output_of(events, "stdout") == b"1\n2\n3\n4\n5\n6\n"


async def test_output_limit_truncates_and_ends(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """Output past the cap is cut exactly at the cap, and the command group is ended."""
    proxy = await make_proxy(max_output_bytes=100_000)
    script = f"sleep {marker} & while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
    events = await exec_events(http, proxy, {"command": ["sh", "-c", script], "timeout": 30})
    exit_event = final(events)
    assert exit_event["reason"] == "output_limit"
    assert exit_event["truncated"] is True
    assert len(output_of(events, "stdout")) == 100_000
    assert exit_event["stdout_bytes"] == 100_000
    assert await survivors(marker, within=0) == []


async def test_term_ignoring_command_is_killed_after_the_grace(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """A group that traps TERM gets KILL once the kill grace is over (only KILL ends it)."""
    proxy = await make_proxy(kill_grace=0.5)
    command = forking(marker, "trap '' TERM; ")
    events = await exec_events(http, proxy, {"command": command, "timeout": 0.5})
    assert final(events)["reason"] == "timeout"
    assert await survivors(marker, within=0) == []


async def test_client_disconnect_ends_the_command(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """A client that hangs up mid-exec leaves nothing running and is counted as client_gone."""
    body = {"command": forking(marker, "echo hello; "), "timeout": 60}
    response = await http.post(f"{proxy.url}/exec", json=body)
    assert json.loads(await response.content.readline())["type"] == "start"
    await wait_for_processes(marker, 2)
    response.close()  # drop the connection without reading on
    assert await survivors(marker) == []
    metrics = await fetch_metrics(http, proxy)
    assert 'session_proxy_exec_requests_total{outcome="client_gone"} 1.0' in metrics
    assert "session_proxy_exec_in_flight 0.0" in metrics


async def test_shutdown_ends_running_execs_with_reason_shutdown(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """Stopping the server past its grace ends each exec with an exit event, reason shutdown."""
    proxy = await make_proxy(shutdown_grace=0.2)
    body = {"command": forking(marker), "timeout": 60}
    responses = [await started_exec(http, proxy, body) for _ in range(3)]
    await proxy.server.stop()
    for response in responses:
        assert final(await remaining_events(response))["reason"] == "shutdown"
    assert await survivors(marker, within=0) == []


async def test_shutdown_lets_short_execs_finish(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An exec running when the drain begins may finish within the grace, and completes normally."""
    proxy = await make_proxy(shutdown_grace=30)
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.01; done; echo finished"
    running = await started_exec(http, proxy, {"command": ["sh", "-c", script]})
    stopping = await start_drain(proxy)
    go.touch()  # only once the drain has begun may the command finish
    events = await remaining_events(running)
    await stopping
    assert final(events)["reason"] == "exited"
    assert output_of(events, "stdout") == b"finished\n"


async def started_exec(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    """POST /exec and return the open response once its ``start`` event has arrived."""
    response = await http.post(f"{proxy.url}/exec", json=body)
    assert response.status == 200, await response.text()
    assert json.loads(await response.content.readline())["type"] == "start"
    return response


async def remaining_events(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    async with response:
        return [json.loads(line) async for line in response.content]


async def fetch_metrics(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        return await response.text()


async def start_drain(proxy: RunningProxy) -> asyncio.Task[None]:
    """Begin ``stop()`` and return once the drain has begun."""
    stopping = asyncio.create_task(proxy.server.stop())
    while not proxy.server.exec_app[SUPERVISOR].draining:
        await asyncio.sleep(0.01)
    return stopping


async def test_while_draining_the_exec_port_answers_503_and_readyz_is_503(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """During the drain a new exec gets JSON 503 shutting_down with Retry-After over TCP (the port
    stays open), /readyz says 503 draining, the refusal is counted; the running exec finishes."""
    proxy = await make_proxy(shutdown_grace=30)
    started, go = tmp_path / "started", tmp_path / "go"
    script = f"touch {started}; while [ ! -e {go} ]; do sleep 0.01; done; echo finished"
    running = await started_exec(http, proxy, {"command": ["sh", "-c", script]})
    stopping = await start_drain(proxy)
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as refused:
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "5"
        assert (await refused.json())["error"]["code"] == "shutting_down"
    async with http.get(f"{proxy.ops_url}/readyz") as readyz:
        assert (readyz.status, await readyz.json()) == (503, {"status": "draining"})
    metrics = await fetch_metrics(http, proxy)
    assert 'session_proxy_rejections_total{reason="shutting_down"} 1.0' in metrics
    go.touch()
    assert final(await remaining_events(running))["reason"] == "exited"
    await stopping


async def test_a_request_being_admitted_when_the_drain_begins_never_starts(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A request still waiting for a rate token when the drain begins gets 503 shutting_down
    instead of starting its command after the drain began."""
    proxy = await make_proxy(rate_limit=0.5, rate_burst=1, rate_limit_wait=30, shutdown_grace=30)
    admission = proxy.server.exec_app[ADMISSION]
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0
    ran = tmp_path / "ran"
    waiting = asyncio.create_task(http.post(f"{proxy.url}/exec", json={"command": ["touch", str(ran)]}))
    while admission.rate_waits == 0:
        await asyncio.sleep(0.01)
    stopping = await start_drain(proxy)
    async with await waiting as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "shutting_down"
    await stopping
    assert not ran.exists()


async def test_a_request_waiting_for_the_pod_ends_with_shutdown_and_never_starts(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """SIGTERM while a request waits for a not-ready pod: it ends at once with an exit event,
    reason shutdown (``waiting`` events went out), and its command never runs, even though the
    pod becomes ready right after the drain began."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"}, ready=False)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=50, shutdown_grace=50)
    ran = tmp_path / "ran"
    async with http.post(f"{proxy.url}/exec", json={"command": ["touch", str(ran)]}) as response:
        assert json.loads(await response.content.readline())["type"] == "waiting"
        stopping = await start_drain(proxy)
        pod.ready = True
        events = [json.loads(line) async for line in response.content]
    assert (final(events)["reason"], final(events)["exit_code"]) == ("shutdown", None)
    assert not any(event["type"] == "start" for event in events)
    await stopping
    assert not ran.exists()


async def test_second_signal_ends_running_execs_without_waiting_out_the_grace(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """A second stop request ends execs at once (reason shutdown) though the grace is 120 s."""
    proxy = await make_proxy(shutdown_grace=120)
    running = await started_exec(http, proxy, {"command": forking(marker), "timeout": 600})
    stopping = await start_drain(proxy)
    proxy.server.request_stop()
    proxy.server.request_stop()
    assert final(await remaining_events(running))["reason"] == "shutdown"
    await stopping
    assert await survivors(marker, within=0) == []


async def test_early_end_reports_no_exit_code_on_kubernetes_either(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """Output limit on the kubernetes backend: exit_code and signal null, as on local (not the
    wrapper's 143), so the CLI maps it to 125 on both."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path, max_output_bytes=1000)
    script = f"sleep {marker} & while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
    exit_event = final(await exec_events(http, proxy, {"command": ["sh", "-c", script], "timeout": 30}))
    assert exit_event["reason"] == "output_limit"
    assert (exit_event["exit_code"], exit_event["signal"]) == (None, None)
    assert exit_code_for(ExitEvent.model_validate(exit_event)) == 125
    assert await survivors(marker) == []


class SlowStartBackend(LocalBackend):
    """The local backend, whose start returns only when the test says so, after spawning."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.spawned = asyncio.Event()
        self.release = asyncio.Event()

    async def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> Any:
        execution = await super().start(spec, on_waiting)
        self.spawned.set()
        await self.release.wait()
        return execution


async def test_shutdown_during_a_start_past_waiting_ends_the_command(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """A drain that begins while the backend is spawning does not cancel the start half-way
    (that would lose the command): the start completes, the command is ended at once, and the
    client is told it started and was ended by the shutdown (a 503 would say it never ran, and a
    caller would run it again)."""
    backend = SlowStartBackend(tmp_path)
    proxy = await make_proxy(exec_backend=backend, shutdown_grace=30)
    request = asyncio.create_task(http.post(f"{proxy.url}/exec", json={"command": forking(marker)}))
    await backend.spawned.wait()
    stopping = await start_drain(proxy)
    backend.release.set()
    async with await request as response:
        assert response.status == 200
        events = [json.loads(line) async for line in response.content]
    assert [event["type"] for event in events] == ["start", "exit"]
    assert final(events)["reason"] == "shutdown"
    await stopping
    assert await survivors(marker) == []


async def test_client_leaving_during_a_start_does_not_lose_the_command(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """A client that hangs up while the backend is still starting: the command that starts
    anyway is ended and accounted for (its log line and metrics, as client_gone), and the
    request is tracked, its slot held, until it is gone."""
    backend = SlowStartBackend(tmp_path)
    proxy = await make_proxy(exec_backend=backend, max_concurrent=1)
    runner = proxy.server._exec_runner
    assert runner is not None
    assert runner.server is not None
    async with aiohttp.ClientSession() as leaving:
        request = asyncio.create_task(leaving.post(f"{proxy.url}/exec", json={"command": forking(marker)}))
        await backend.spawned.wait()
        request.cancel()
    await wait_for_processes(marker, 2)
    while runner.server.connections:
        await asyncio.sleep(0.01)  # the request is over, the start still blocked
    assert proxy.server.exec_app[ADMISSION].active == 1
    assert proxy.server.exec_app[SUPERVISOR].in_flight == 1
    backend.release.set()
    assert await survivors(marker) == []
    while proxy.server.exec_app[ADMISSION].active or proxy.server.exec_app[SUPERVISOR].in_flight:
        await asyncio.sleep(0.01)
    metrics = await fetch_metrics(http, proxy)
    assert 'session_proxy_exec_requests_total{outcome="client_gone"} 1.0' in metrics
    assert "session_proxy_exec_in_flight 0.0" in metrics
