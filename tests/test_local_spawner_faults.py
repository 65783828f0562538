"""A stopped or killed spawner costs no request: it is replaced and the start tried again when
nothing ran, and the wait for it never outlasts the request's deadline."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import psutil

from session_proxy.backends.base import ExecSpec, OutputChunk
from session_proxy.backends.local import LocalBackend, LocalExecution
from session_proxy.backends.local_spawner import SPAWNER_MODULE, CommandPipes, LeaderChannel, Spawner

from .conftest import RunningProxy, exec_events, final, output_of


def spawners() -> list[psutil.Process]:
    """This process's spawner helpers still running."""
    return [
        child for child in psutil.Process().children()
        if SPAWNER_MODULE in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE
    ]  # fmt: skip


async def no_waiting(message: str) -> None:
    raise AssertionError(f"a local start never waits: {message}")


async def output_and_status(execution: LocalExecution) -> tuple[bytes, int | None]:
    chunks: list[OutputChunk] = []
    while (chunk := await execution.next_chunk()) is not None:
        chunks.append(chunk)
    status = execution.exit_status()
    await execution.close()
    return b"".join(chunk.data for chunk in chunks if chunk.stream == "stdout"), status.exit_code


async def test_a_stopped_spawner_is_replaced_and_the_command_runs(
    http: aiohttp.ClientSession, proxy: RunningProxy
) -> None:
    """Requests sent to a SIGSTOPped spawner run on a new one: the stopped one is killed, with
    the requests queued on it, which had not run."""
    [stopped] = spawners()
    stopped.suspend()
    try:
        body = {"command": ["sh", "-c", "echo ran"], "timeout": 20}
        results = await asyncio.gather(*(exec_events(http, proxy, body) for _ in range(4)))
    finally:
        if stopped.is_running():
            stopped.resume()
    for events in results:
        assert final(events)["exit_code"] == 0
        assert output_of(events, "stdout") == b"ran\n"
    assert not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE
    [replacement] = spawners()
    assert replacement.pid != stopped.pid


async def test_a_killed_spawner_costs_no_start(tmp_path: Path) -> None:
    """Starts made just after the spawner was SIGKILLed (before the proxy can know) all run:
    nothing had reached a leader, so each is tried again on one new spawner."""
    backend = LocalBackend(tmp_path)
    await backend.open()
    try:
        [killed] = spawners()
        os.kill(killed.pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        specs = [
            ExecSpec(f"exec-{n}", ["echo", str(n)], None, {}, None, timeout=20, arrived=loop.time())
            for n in range(6)
        ]
        executions = await asyncio.gather(*(backend.start(spec, no_waiting) for spec in specs))
        results = [await output_and_status(execution) for execution in executions]  # type: ignore[arg-type]
        assert results == [(f"{n}\n".encode(), 0) for n in range(6)]
        [replacement] = spawners()
        assert replacement.pid != killed.pid
    finally:
        await backend.close()


async def test_the_deadline_bounds_the_wait_for_a_stopped_spawner(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """A request whose timeout runs out while the spawner is stopped gets a JSON 503 (nothing
    ran, retry) at its deadline, and its command never runs, not even once the spawner goes on."""
    [stopped] = spawners()
    stopped.suspend()
    ran = tmp_path / "ran"
    try:
        async with http.post(
            f"{proxy.url}/exec", json={"command": ["touch", str(ran)], "timeout": 0.3}
        ) as response:
            body = await response.json()
            assert response.status == 503, body
            assert response.headers["Retry-After"] == "1"
    finally:
        if stopped.is_running():
            stopped.resume()
    assert body["error"]["code"] == "spawner_unavailable"
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0
    assert not ran.exists()


async def test_a_leader_refuses_a_start_past_its_deadline() -> None:
    """A leader that reads its command after ``start_by`` (its spawner was stuck) reports a
    ``deadline`` failure instead of running it."""
    spawner = await Spawner.start()
    pipes = CommandPipes(with_stdin=False)
    try:
        try:
            await spawner.request(pipes.for_leader)
        finally:
            pipes.close_leader_ends()
        channel = await LeaderChannel.connect(pipes.control)
        late = time.monotonic() - 1
        channel.send({"argv": ["true"], "cwd": "/", "env": {}, "start_by": late})
        report = await channel.receive()
        await channel.close()
    finally:
        pipes.close_ours(control=False)
        await spawner.close()
    assert report is not None
    assert report["failed"] == "deadline"
