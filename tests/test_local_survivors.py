"""Processes that survive KILL are found by the leader, then logged and counted by the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from session_proxy.backends.base import ExitStatus
from session_proxy.backends.local import LocalExecution
from session_proxy.backends.local_output import CommandOutput
from session_proxy.backends.process_tree import TreeEnder, _live_descendants_from_table, live_descendants
from session_proxy.metrics import Metrics

from .conftest import processes_with


def kill_tree(root: subprocess.Popen[bytes], marker: str) -> None:
    """SIGKILL the test's own process group and wait until its marked processes are gone: the
    orphaned ones die when next scheduled, which on a busy machine is not at once."""
    os.killpg(root.pid, signal.SIGKILL)
    root.wait()
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.02)


def wait_for_sleepers(marker: str, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while len(found := [p for p in processes_with(marker) if p.info["cmdline"][0] == "sleep"]) < count:
        assert time.monotonic() < deadline, "sleepers never started"
        time.sleep(0.02)
    return sorted(p.pid for p in found)


@pytest.mark.timeout(30)
def test_tree_ender_reports_a_process_that_survives_kill(marker: str) -> None:
    """A process that ignores even KILL (played by a sender that drops its signals) is
    returned as a survivor; the rest of the tree is ended."""
    root = subprocess.Popen(["sh", "-c", f"sleep {marker} & sleep {marker} & wait"], start_new_session=True)
    try:
        immortal, mortal = wait_for_sleepers(marker, 2)

        def send(pid: int, sig: int) -> None:
            if pid != immortal:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

        survivors = TreeEnder(root.pid, wait=time.sleep, send=send).end(grace=0.2)
        assert survivors == [immortal]
        assert [entry.pid for entry in live_descendants(root.pid)] == [immortal]
        assert mortal not in [p.pid for p in processes_with(marker)]
        assert root.poll() is None  # the root itself is not part of what is ended
    finally:
        kill_tree(root, marker)


@pytest.mark.timeout(30)
def test_both_tree_walks_find_the_same_descendants(marker: str) -> None:
    """The walk through /proc/<pid>/task/*/children and the full /proc scan (for kernels
    without that file) agree on a tree three levels deep."""
    script = f"sleep {marker} & sh -c 'sleep {marker} & sleep {marker}' & wait"
    root = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        wait_for_sleepers(marker, 3)
        walked = sorted(entry.pid for entry in live_descendants(root.pid))
        assert len(walked) == 4  # three sleepers and the inner shell
        assert walked == sorted(entry.pid for entry in _live_descendants_from_table(root.pid))
    finally:
        kill_tree(root, marker)


class LeaderReportingASurvivor:
    """A leader channel that answers a terminate with an exit by KILL and one survivor."""

    def __init__(self, survivor: int) -> None:
        self.sent: list[dict[str, Any]] = []
        self._survivor = survivor
        self._replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if "terminate" in message:
            self._replies.put_nowait({"exited": -signal.SIGKILL})
            self._replies.put_nowait({"terminated": [self._survivor]})

    async def receive(self) -> dict[str, Any] | None:
        return await self._replies.get()

    async def close(self) -> None:
        self._replies.put_nowait(None)


@pytest.mark.timeout(30)
async def test_survivors_are_logged_with_pids_and_counted(
    caplog: pytest.LogCaptureFixture, marker: str
) -> None:
    """Survivors reported by the leader give one warning (pids, no argv) and count in the metric."""
    command = subprocess.Popen(["sleep", marker], start_new_session=True)  # a real group to name
    metrics = Metrics()
    leader = LeaderReportingASurvivor(survivor=4242)
    execution = LocalExecution(
        "local:/tmp",
        "exec-1",
        command.pid,
        leader,
        CommandOutput(),
        None,
        metrics,  # type: ignore[arg-type]
    )
    try:
        with caplog.at_level(logging.WARNING, logger="session_proxy.backends.local"):
            status = await execution.terminate(1.0)
        await execution.close()
    finally:
        command.kill()
        command.wait()
    assert status == ExitStatus(exit_code=None, signal=signal.SIGKILL)
    assert leader.sent == [{"terminate": 1.0, "spare_detached": False}]
    [record] = [r for r in caplog.records if r.getMessage() == "processes survived KILL"]
    assert record.levelno == logging.WARNING
    assert record.pids == [4242]  # type: ignore[attr-defined]
    assert record.exec_id == "exec-1"  # type: ignore[attr-defined]
    assert marker not in caplog.text
    assert b"session_proxy_processes_survived_kill_total 1.0" in metrics.exposition()
