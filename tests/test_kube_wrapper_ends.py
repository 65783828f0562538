"""What the wrapper does on its own in the workspace: its backstop deadline, its dead-man switch,
and what it leaves alone (a process detached on purpose)."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from yarl import URL

from session_proxy.backends.base import ExitStatus
from session_proxy.backends.kubernetes.exec_stream import ExecStream
from session_proxy.backends.kubernetes.execution import KubernetesExecution
from session_proxy.backends.kubernetes.wrapper import SHELL, WRAPPER_SCRIPT, encode_header, new_nonce
from session_proxy.models import Guarantees

from .conftest import (
    TOKEN,
    KubeSetup,
    ProxyProcess,
    exec_events,
    final,
    forking,
    output_of,
    processes_with,
    survivors,
    wait_for_processes,
)
from .kube_api_server import V4, V5, Fault

EVERYTHING = Guarantees(workdir=True, env=True, stdin=True, kill=True, runner="shell")


@pytest.fixture
async def wrapper_exec(kube: Any) -> AsyncIterator[Callable[..., Any]]:
    """Opens the real wrapper exec on the API test server directly, as the backend does, with
    no proxy around it: nobody kills the command but the wrapper itself."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    context = ssl.create_default_context(cadata=kube.ca_pem.decode())
    async with aiohttp.ClientSession() as session:
        streams: list[ExecStream] = []

        async def open_exec() -> ExecStream:
            query = [("command", part) for part in (SHELL, "-c", WRAPPER_SCRIPT)]
            query += [("container", "workspace"), ("stdin", "true"), ("stdout", "true"), ("stderr", "true")]
            url = URL(kube.url).with_path("/api/v1/namespaces/default/pods/ws-1/exec").with_query(query)
            socket = await session.ws_connect(
                url, protocols=(V5, V4), headers={"Authorization": f"Bearer {TOKEN}"}, ssl=context
            )
            streams.append(ExecStream(socket, ping_interval=5, ping_timeout=30))
            return streams[-1]

        yield open_exec
        for stream in streams:
            await stream.close()


async def run_to_the_end(execution: KubernetesExecution) -> ExitStatus:
    while await execution.next_chunk() is not None:
        pass
    return execution.exit_status()


async def lost(stream: ExecStream) -> ExitStatus:
    return ExitStatus(None, reason="transport_lost", message="no exit marker")


async def no_kill(pgid: int, grace: float) -> None:
    raise AssertionError("nothing here may kill through a second exec")


def wrapped(stream: ExecStream, nonce: str) -> KubernetesExecution:
    return KubernetesExecution(
        stream, target="t", guarantees=EVERYTHING, nonce=nonce, kill_group=no_kill,
        explain_lost_stream=lost, stdin=None,
    )  # fmt: skip


def header(nonce: str, argv: list[str], *, deadline: int) -> bytes:
    return encode_header(
        nonce=nonce, argv=argv, workdir=None, env={}, stdin_length=0, deadline=deadline, grace=1
    )


@pytest.mark.timeout(60)
async def test_backstop_deadline_ends_the_command(wrapper_exec: Any, marker: str) -> None:
    """Left alone past its deadline, the wrapper ends the whole group itself and says so: the
    exit reads as a timeout, not as the command's own 143."""
    nonce = new_nonce()
    stream = await wrapper_exec()
    await stream.send_stdin(header(nonce, ["sh", "-c", f"sleep {marker} & sleep {marker}"],
                                                deadline=2))  # fmt: skip
    await wait_for_processes(marker, 2)
    status = await asyncio.wait_for(run_to_the_end(wrapped(stream, nonce)), timeout=30)
    assert (status.reason, status.exit_code) == ("timeout", None)
    assert "deadline" in (status.message or "")
    assert await survivors(marker) == []


@pytest.mark.timeout(60)
async def test_stdin_closing_ends_the_command_as_transport_lost(
    wrapper_exec: Any, marker: str, api_mode: str
) -> None:
    """When the exec's stdin closes while its output still flows (the API server half-closes
    it when a client's stream dies), the wrapper ends the group and reports transport_lost."""
    if api_mode == "old":
        pytest.skip("v4 cannot close stdin alone; only v5's CLOSE can")
    nonce = new_nonce()
    stream = await wrapper_exec()
    await stream.send_stdin(header(nonce, ["sh", "-c", f"sleep {marker} & sleep {marker}"],
                                                deadline=600))  # fmt: skip
    await wait_for_processes(marker, 2)
    assert await stream.close_stdin()  # v5's CLOSE
    status = await asyncio.wait_for(run_to_the_end(wrapped(stream, nonce)), timeout=30)
    assert (status.reason, status.exit_code) == ("transport_lost", None)
    assert await survivors(marker) == []


@pytest.mark.timeout(90)
async def test_backstop_fires_when_the_proxy_cannot_end_the_command(
    http: aiohttp.ClientSession, kube: Any, spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path,
    marker: str,
) -> None:  # fmt: skip
    """A proxy that is frozen past the timeout (its stream stays open, so the dead-man switch
    does not fire) cannot end the command; the wrapper's backstop deadline does."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    config = kube.write_kubeconfig(tmp_path / "kc", TOKEN)
    proxy = spawn_proxy("--backend", "kubernetes", "--kubeconfig", str(config), "--namespace", "default",
                        "--session-name", "s1", "--kill-grace", "1")  # fmt: skip
    body = {"command": ["sh", "-c", f"sleep {marker} & sleep {marker}"], "timeout": 1}
    async with http.post(f"{proxy.url}/exec", json=body) as response:
        await response.content.readline()
        await wait_for_processes(marker, 2)
        process = psutil.Process(proxy.process.pid)
        process.suspend()
        try:
            # The backstop is the timeout + the grace + a margin (7 s here); the proxy sleeps on.
            assert await survivors(marker, within=40) == []
            assert process.status() == psutil.STATUS_STOPPED
        finally:
            process.resume()
        events = [json.loads(line) for line in (await response.text()).splitlines()]
    assert final(events)["reason"] == "timeout"


async def test_detached_process_outlives_its_command(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """What the README tells users: `setsid cmd >log 2>&1 </dev/null &` outlives its command,
    while a plain background child of the same command is ended."""
    detached = marker.replace("300.", "301.", 1)  # its own marker: it is meant to be left running
    script = f"sleep {marker} & setsid sleep {detached} >/dev/null 2>&1 </dev/null & echo started"
    try:
        events = await exec_events(http, kube_setup.proxy, {"command": ["sh", "-c", script], "timeout": 30})
        assert output_of(events, "stdout") == b"started\n"
        assert (final(events)["reason"], final(events)["exit_code"]) == ("exited", 0)
        assert await survivors(marker, within=15) == []  # the group's leftover is gone ...
        assert [p for p in processes_with(detached) if p.status() != psutil.STATUS_ZOMBIE]  # ... this is not
    finally:
        for process in processes_with(detached):
            process.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("shell", ["dash", "bash", "busybox sh"])
async def test_command_does_not_inherit_an_ignored_sigpipe(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, shell: str
) -> None:
    """The wrapper ignores SIGPIPE for its own reports only: the command starts with it at the
    default, so `producer | head` ends quietly instead of failing with broken-pipe errors."""
    kube_setup.pod.shell = shell
    events = await exec_events(http, kube_setup.proxy, {"command": ["grep", "SigIgn", "/proc/self/status"]})
    ignored = int(output_of(events, "stdout").split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), hex(ignored)


# Cold only: it changes the image (or faults the next exec) after the pool's execs were opened.
@pytest.mark.parametrize("exec_path", ["cold"])
async def test_stdin_closed_upstream_is_reported_as_transport_lost(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """Through the proxy: when the exec's stdin is closed upstream while the stream lives on,
    the wrapper's dead-man switch ends the group and the exit says transport_lost, not 143."""
    await exec_events(http, kube_setup.proxy, {"command": ["true"]})  # the image probe, done
    kube_setup.api.faults.append(Fault("/exec", close_stdin_after_frames=1))
    events = await exec_events(http, kube_setup.proxy, {"command": forking(marker), "timeout": 20})
    exit_event = final(events)
    assert (exit_event["reason"], exit_event["exit_code"]) == ("transport_lost", None)
    assert "wrapper" in exit_event["message"]
    assert await survivors(marker) == []


def backstop_sleeps(seconds: set[str]) -> list[psutil.Process]:
    """The wrappers' deadline timers still sleeping for one of these durations."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        command = process.info["cmdline"] or []
        is_sleep = process.info["status"] != psutil.STATUS_ZOMBIE and command[:1] == ["sleep"]
        if is_sleep and command[1:2] and command[1] in seconds:
            found.append(process)
    return found


@pytest.mark.timeout(120)
async def test_backstop_timer_leaves_no_sleep_behind(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """Short commands end their wrapper's deadline timer with them: no `sleep` outlives it. (A
    TERM that came before the sleep's pid was known, or between its fork and its exec, used to
    leave it running for the whole backstop: about 1 exec in 6.)"""
    for _ in range(40):
        events = await exec_events(http, kube_setup.proxy, {"command": ["true"], "timeout": 1234})
        assert final(events)["reason"] == "exited"
    # The backstop is the time left (1233 or 1234 s) + the kill grace (1 s) + 5 s.
    durations = {"1239", "1240"}
    deadline = asyncio.get_running_loop().time() + 15
    while (left := backstop_sleeps(durations)) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    assert left == []
