"""Ending a task from another one without losing a cancellation aimed at the one that waits.

``task.cancel()`` followed by ``await task`` inside ``suppress(CancelledError)`` swallows two
different things: the ended task's own ``CancelledError`` (wanted) and a cancel of the waiting
task itself that lands during the wait (a departed client, a stopping proxy), which then goes on
as if nothing had happened. ``Task.cancelling()`` tells the two apart.
"""

from __future__ import annotations

import asyncio
from typing import Any


def cancel_requested() -> bool:
    """The running task has been asked to cancel (and has not taken it back)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; its own end (cancelled or not) is not an
    error, but a cancellation of the caller propagates (after ``task`` ended, as a cancel of the
    caller during the wait is passed on to ``task`` and the caller resumes when it is done).
    An exception ``task`` raised propagates."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if cancel_requested():
            raise
