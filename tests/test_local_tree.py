"""The local backend ends everything a command started, wherever in the tree it went."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil

from .conftest import (
    LISTENING,
    ProxyFactory,
    ProxyProcess,
    RunningProxy,
    exec_events,
    final,
    processes_with,
    survivors,
)


def escaping(marker: str, then: str = "") -> list[str]:
    """Five sleepers: three in sessions of their own (one orphaned by a subshell that exits at
    once, one detached on purpose, its output to /dev/null), one in a group of its own (bash's
    job control), one in the command's group."""
    escapes = (
        f"setsid sleep {marker} & (setsid sleep {marker} &); "
        f"setsid sleep {marker} >/dev/null 2>&1 </dev/null & "
        f"set -m; sleep {marker} & set +m; "
    )
    return ["bash", "-c", escapes + (then or f"sleep {marker}")]


async def escaped(marker: str) -> None:
    """Wait for the five sleepers and check that they really did leave group and session."""
    deadline = time.monotonic() + 10
    while len(found := [p for p in processes_with(marker) if p.info["cmdline"][0] == "sleep"]) < 5:
        assert time.monotonic() < deadline, f"sleepers never started: {found}"
        await asyncio.sleep(0.02)
    sessions = {os.getsid(p.pid) for p in found}
    groups = {os.getpgid(p.pid) for p in found}
    assert (len(found), len(sessions), len(groups)) == (5, 4, 5), (found, sessions, groups)


async def test_client_gone_ends_processes_that_left_the_group(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """A client hanging up ends the command's children in other groups and sessions too, even
    one detached on purpose: an early end takes everything the command started."""
    response = await http.post(f"{proxy.url}/exec", json={"command": escaping(marker), "timeout": 60})
    assert json.loads(await response.content.readline())["type"] == "start"
    await escaped(marker)
    response.close()
    assert await survivors(marker) == []


async def test_shutdown_ends_processes_that_left_the_group(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """Shutdown ends escaped children before the exit event is sent."""
    proxy = await make_proxy(shutdown_grace=0.1)
    request = asyncio.create_task(exec_events(http, proxy, {"command": escaping(marker), "timeout": 60}))
    await escaped(marker)
    await proxy.server.stop()
    assert final(await request)["reason"] == "shutdown"
    assert await survivors(marker, within=0) == []


async def test_idle_timeout_ends_processes_that_left_the_group(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str, tmp_path: Path
) -> None:
    """A timer ending the command (here the idle timeout) ends escaped children too."""
    proxy = await make_proxy(idle_timeout=0.5, kill_grace=0.5)
    gate = tmp_path / "gate"
    # The command keeps talking until the test has seen the escapes, so the timer cannot fire first.
    talk = f"while [ ! -e {gate} ]; do echo .; sleep 0.05; done; sleep {marker}"
    command = escaping(marker, f"sleep {marker} & {talk}")
    request = asyncio.create_task(exec_events(http, proxy, {"command": command, "timeout": 60}))
    await escaped(marker)
    gate.touch()
    assert final(await request)["reason"] == "idle_timeout"
    assert await survivors(marker, within=0) == []


async def test_detached_process_outlives_its_command_and_the_rest_does_not(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """After a normal exit, a process detached on purpose (own session, output to a file) stays;
    one in its own session still writing to the exec's pipes, and the group's leftovers, end."""
    detached, on_pipes, in_group = f"{marker}1", f"{marker}2", f"{marker}3"
    script = (
        f"setsid sleep {detached} >/dev/null 2>&1 </dev/null & "
        f"setsid sleep {on_pipes} & sleep {in_group} & echo started"
    )
    exit_event = final(await exec_events(http, proxy, {"command": ["sh", "-c", script]}))
    assert exit_event["reason"] == "exited"
    assert exit_event["exit_code"] == 0
    try:
        assert await survivors(in_group) == []
        assert await survivors(on_pipes) == []
        kept = processes_with(detached)
        assert len(kept) == 1
        assert os.getsid(kept[0].pid) == kept[0].pid
    finally:
        for process in processes_with(detached):
            process.kill()


async def test_sigkilled_proxy_leaves_nothing_running(
    spawn_proxy: Callable[..., ProxyProcess], http: aiohttp.ClientSession, marker: str
) -> None:
    """A proxy killed with SIGKILL takes a silent command and all it started with it."""
    proxy = spawn_proxy()
    response = await http.post(f"{proxy.url}/exec", json={"command": escaping(marker), "timeout": 600})
    assert json.loads(await response.content.readline())["type"] == "start"
    await escaped(marker)
    helpers = psutil.Process(proxy.process.pid).children()
    assert helpers, "the spawner should be running"
    proxy.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(proxy.process.wait, 30)
    response.close()
    assert await survivors(marker) == []
    _, alive = await asyncio.to_thread(psutil.wait_procs, helpers, 10)
    assert alive == [], "the spawner outlived the proxy"


async def test_ctrl_c_to_the_proxys_group_drains_and_leaves_nothing(
    http: aiohttp.ClientSession, tmp_path: Path, marker: str
) -> None:
    """SIGINT to the proxy's whole process group (a terminal's Ctrl-C) reaches the proxy only:
    the spawner and the leaders live on until the proxy has ended the command (shutdown)."""
    log_path = tmp_path / "proxy.log"
    command = [
        sys.executable, "-m", "session_proxy", "serve", "--listen", "127.0.0.1:0", "--ops-listen", "",
        "--backend", "local", "--local-root", str(tmp_path), "--shutdown-grace", "0.2", "--kill-grace", "1",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (match := LISTENING.search(log_path.read_bytes())):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the proxy did not start"
            await asyncio.sleep(0.02)
        url = match.group(1).decode()
        response = await http.post(f"{url}/exec", json={"command": escaping(marker), "timeout": 60})
        assert json.loads(await response.content.readline())["type"] == "start"
        await escaped(marker)
        os.killpg(process.pid, signal.SIGINT)
        events = [json.loads(line) async for line in response.content]
        assert final(events)["reason"] == "shutdown"
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert await survivors(marker, within=0) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_command_that_kills_its_leader_is_still_ended(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """A command that kills its leader gets an ``error`` exit saying so, and its group is
    still killed by the proxy itself (after the exit event, as leftovers of any ended command)."""
    # stdin is fed once the leader has reported the start, so the kill cannot come before it.
    command = ["sh", "-c", f"sleep {marker} & read go; kill -KILL $PPID; sleep {marker}"]
    body = {"command": command, "stdin": "go\n", "timeout": 60}
    exit_event = final(await exec_events(http, proxy, body))
    assert exit_event["reason"] == "error"
    assert "leader" in exit_event["message"]
    assert await survivors(marker) == []
