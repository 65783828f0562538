"""Descriptors on the local backend: none leak when the proxy runs out of them or when a
child keeps the command's stdin, and running out is a clear refusal to retry."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import ProxyProcess, RunningProxy, exec_events, final, survivors

CONCURRENT = 8
ROUNDS = 3


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int, expected: int, within: float = 10.0) -> int:
    """The process's descriptor count once it is back to ``expected`` (or the last seen)."""
    deadline = time.monotonic() + within
    while (count := open_fds(pid)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return count


class Answers:
    """Opens the gate once every exec has been answered, or as soon as one is refused (a
    refusal frees descriptors, so the rest may only get theirs after the gate opens)."""

    def __init__(self, expected: int) -> None:
        self.left = expected
        self.open_gate = asyncio.Event()

    def answered(self, *, refused: bool) -> None:
        self.left -= 1
        if refused or not self.left:
            self.open_gate.set()


async def gated_exec(
    http: aiohttp.ClientSession, url: str, gate: Path, answers: Answers
) -> tuple[int, dict[str, Any]]:
    """One exec that waits for ``gate``; its status and its error body (or its exit event)."""
    command = ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"]
    async with http.post(f"{url}/exec", json={"command": command, "timeout": 30}) as response:
        if response.status != 200:
            assert response.headers["Content-Type"].startswith("application/json")
            body = await response.json()
            body["retry_after_header"] = response.headers.get("Retry-After")
            answers.answered(refused=True)
            return response.status, body
        assert json.loads(await response.content.readline())["type"] == "start"
        answers.answered(refused=False)
        events = [json.loads(line) for line in (await response.text()).split("\n") if line]
        return 200, final(events)


async def test_out_of_descriptors_is_a_503_and_leaks_nothing(
    spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """With the proxy's descriptor limit just above its idle need, concurrent execs either run
    or get a JSON 503 ``out_of_descriptors`` with Retry-After (counted), and every round
    leaves the proxy with exactly the descriptors it had before."""
    proxy = spawn_proxy("--max-concurrent", str(CONCURRENT))
    pid = proxy.process.pid
    async with aiohttp.ClientSession() as http:
        running = RunningProxy(None, proxy.url, proxy.ops_url)  # type: ignore[arg-type]
        final(await exec_events(http, running, {"command": ["true"]}))
    idle = await settled_fds(pid, -1, within=0.5)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (idle + 2 * CONCURRENT, hard))
    statuses: list[int] = []
    for round_number in range(ROUNDS):
        gate = tmp_path / f"gate-{round_number}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENT)) as http:
            answers = Answers(CONCURRENT)
            execs = [gated_exec(http, proxy.url, gate, answers) for _ in range(CONCURRENT)]
            tasks = [asyncio.create_task(one) for one in execs]
            await answers.open_gate.wait()
            gate.touch()
            results = await asyncio.gather(*tasks)
        for status, body in results:
            statuses.append(status)
            if status == 200:
                assert body["reason"] == "exited", body
                continue
            assert status == 503, body
            assert body["error"]["code"] == "out_of_descriptors", body
            assert body["retry_after_header"] == "1"
        assert await settled_fds(pid, idle) == idle, f"round {round_number}: descriptors leaked"
    assert 503 in statuses, statuses
    assert 200 in statuses, statuses
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))  # room for the scrape
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.ops_url}/metrics") as response:
        metrics = await response.text()
    refusals = statuses.count(503)
    assert f'session_proxy_rejections_total{{reason="out_of_descriptors"}} {refusals}.0' in metrics


async def test_a_child_holding_stdin_is_ended_and_the_pipe_closed(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """A child in a session of its own that keeps the command's stdin (and never reads it) is
    not detached on purpose: it is ended, and the proxy's end of the pipe, with the input it
    still held, is closed."""
    stdin = "x" * 800_000  # far more than a pipe holds: the proxy keeps the rest buffered
    command = ["sh", "-c", f"exec 3<&0; setsid sleep {marker} 0<&3 >/dev/null 2>&1 & exit 0"]
    body = {"command": command, "stdin": stdin, "timeout": 30}
    assert final(await exec_events(http, proxy, body))["exit_code"] == 0
    assert await survivors(marker) == []
    baseline = open_fds(os.getpid())
    for _ in range(3):
        assert final(await exec_events(http, proxy, body))["exit_code"] == 0
    assert await survivors(marker) == []
    assert await settled_fds(os.getpid(), baseline) == baseline
