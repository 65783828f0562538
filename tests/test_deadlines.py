"""The exec deadline: idle and wall-clock limits on one timer, cheap per chunk."""

from __future__ import annotations

import asyncio
import tracemalloc

from session_proxy.deadlines import ExecDeadline

CHUNKS = 5000


async def test_output_allocates_no_timer_handle_per_chunk() -> None:
    """Thousands of chunks with an idle limit leave no timer handles behind in asyncio."""
    loop = asyncio.get_running_loop()
    deadline = ExecDeadline(loop.time(), timeout=60, idle=30)
    async with deadline.running():
        deadline.awaiting_output()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(CHUNKS):
                deadline.output_arrived()
                deadline.awaiting_output()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    grown = [
        stat for stat in after.compare_to(before, "filename")
        if "asyncio" in stat.traceback[0].filename and stat.count_diff > 0
    ]  # fmt: skip
    assert sum(stat.count_diff for stat in grown) < 10, grown


async def test_idle_limit_ends_a_quiet_wait() -> None:
    """No output for the idle time expires the timer with reason idle_timeout."""
    loop = asyncio.get_running_loop()
    deadline = ExecDeadline(loop.time(), timeout=60, idle=0.05)
    quiet = asyncio.Event()
    try:
        async with deadline.running():
            deadline.awaiting_output()
            await quiet.wait()
    except TimeoutError:
        pass
    assert deadline.expired()
    assert deadline.reason() == "idle_timeout"


async def test_output_keeps_the_idle_limit_away() -> None:
    """Chunks arriving more often than the idle time never expire it; the wall clock does."""
    loop = asyncio.get_running_loop()
    deadline = ExecDeadline(loop.time(), timeout=0.6, idle=0.2)
    chunks = 0
    try:
        async with deadline.running():
            while True:
                deadline.awaiting_output()
                await asyncio.sleep(0.01)
                deadline.output_arrived()
                chunks += 1
    except TimeoutError:
        pass
    assert deadline.reason() == "timeout"
    assert chunks > 0


async def test_a_slow_write_is_not_idle() -> None:
    """Time spent writing a chunk (output arrived, not awaiting) never counts as idle."""
    loop = asyncio.get_running_loop()
    deadline = ExecDeadline(loop.time(), timeout=0.5, idle=0.1)
    try:
        async with deadline.running():
            deadline.awaiting_output()
            deadline.output_arrived()
            await asyncio.sleep(5)  # a client that does not read
    except TimeoutError:
        pass
    assert deadline.reason() == "timeout"


async def test_stop_now_expires_with_reason_shutdown() -> None:
    """stop_now ends the wait at once and says shutdown."""
    loop = asyncio.get_running_loop()
    deadline = ExecDeadline(loop.time(), timeout=60, idle=30)
    try:
        async with deadline.running():
            deadline.awaiting_output()
            loop.call_soon(deadline.stop_now)
            await asyncio.sleep(30)
    except TimeoutError:
        pass
    assert deadline.reason() == "shutdown"
