"""Ending a process group for good: TERM, a grace period, then KILL.

A process group outlives its leader, and its members may be zombies nobody reaps (a container
whose PID 1 does not reap orphans), so "is anyone left?" is answered from /proc, ignoring
zombies, rather than from ``killpg(pgid, 0)`` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

PROC = Path("/proc")
POLL_START = 0.005
POLL_MAX = 0.05
KILL_CONFIRM_TIMEOUT = 2.0


def _send(pgid: int, sig: int) -> bool:
    """Signal the group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but not ours any more: nothing we may do
    return True


def _live_members(pgid: int) -> bool:
    if not _send(pgid, 0):
        return False
    if not PROC.is_dir():
        return True
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may contain anything.
        fields = stat[stat.rfind(")") + 2 :].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            return True
    return False


async def _wait_gone(pgid: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = POLL_START
    while _live_members(pgid):
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, POLL_MAX)
    return True


async def terminate_group(pgid: int, grace: float, *, leader_exited: Callable[[], Awaitable[int]]) -> bool:
    """TERM the group, give it ``grace`` seconds, then KILL; True when nobody is left.

    ``leader_exited`` reaps the group leader (our child), so it cannot linger as a zombie.
    """
    if _send(pgid, signal.SIGTERM) and grace > 0:
        _send(pgid, signal.SIGCONT)  # a stopped process cannot act on TERM
        if await _wait_gone(pgid, grace):
            await leader_exited()
            return True
    _send(pgid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_CONFIRM_TIMEOUT):
            await leader_exited()
    return await _wait_gone(pgid, KILL_CONFIRM_TIMEOUT)
