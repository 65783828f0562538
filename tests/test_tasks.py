"""``cancel_and_wait``: ending a task never swallows a cancel aimed at the one that waits."""

from __future__ import annotations

import asyncio

import pytest

from session_proxy.tasks import cancel_and_wait

pytestmark = pytest.mark.timeout(10)


async def test_the_ended_tasks_own_cancellation_is_not_an_error() -> None:
    """Cancelling a running task and waiting for it returns once it has ended."""
    sleeper = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    await cancel_and_wait(sleeper)
    assert sleeper.cancelled()


async def test_a_cancel_of_the_waiter_propagates_after_the_task_ended() -> None:
    """A cancel of the caller that lands while it waits for the ended task is passed on (the
    caller is cancelled), and only once that task is over."""
    release = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await release.wait()  # its clean-up takes a while

    slow = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cancel_and_wait(slow))
    await asyncio.sleep(0)  # the waiter now waits for ``slow`` to end
    waiter.cancel()
    await asyncio.sleep(0)
    assert not waiter.done()  # ``slow`` is still ending
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slow.done()


async def test_a_failure_of_the_task_propagates() -> None:
    """An exception the task raised while ending is not hidden."""

    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RuntimeError("clean-up failed") from None

    failing = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="clean-up failed"):
        await cancel_and_wait(failing)
