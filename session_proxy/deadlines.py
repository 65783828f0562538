"""The time limits of one exec (wall clock, idle, an early stop) as one asyncio timeout.

The timeout is set at the wall-clock deadline and stays there; the idle limit is checked
lazily: one timer handle per idle period looks at when the wait for output began and either
expires the timeout or arms itself again for the rest of the period. Output arriving only
stores a float and a flag, so the per-chunk cost allocates no timer handle. Waiting for output
may be cut by either limit, writing to a slow client by the wall clock only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .models import ExitReason


class ExecDeadline:
    """When an exec must end: ``timeout`` after it arrived, or ``idle`` seconds without output."""

    def __init__(self, arrived: float, timeout: float, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.arrived = arrived  # loop time: the timeout counts from the request's arrival
        self.deadline = arrived + timeout
        self._idle = idle
        self._timer: asyncio.Timeout | None = None
        self._idle_check: asyncio.TimerHandle | None = None
        self._awaiting = False
        self._awaiting_since = 0.0
        self._stopped = False

    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return self._loop.time() - self.arrived

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The timer around the streaming loop; it raises ``TimeoutError`` on expiry."""
        self._timer = asyncio.timeout_at(self._loop.time() if self._stopped else self.deadline)
        try:
            async with self._timer:
                yield
        finally:
            if self._idle_check is not None:
                self._idle_check.cancel()
                self._idle_check = None

    def awaiting_output(self) -> None:
        """Waiting for the next chunk: the idle deadline applies too."""
        if not self._idle:
            return
        self._awaiting = True
        self._awaiting_since = self._loop.time()
        if self._idle_check is None and self._timer is not None and not self._stopped:
            self._idle_check = self._loop.call_at(self._awaiting_since + self._idle, self._check_idle)

    def output_arrived(self) -> None:
        """A chunk came: only the wall clock applies while it is written."""
        self._awaiting = False

    def _check_idle(self) -> None:
        """Expire the timeout if the wait for output has lasted ``idle``; else look again later."""
        self._idle_check = None
        if self._stopped or self._timer is None or self._timer.expired():
            return
        now = self._loop.time()
        due = self._awaiting_since + self._idle if self._awaiting else now + self._idle
        if due <= now:
            self._timer.reschedule(now)
        elif due < self.deadline:
            self._idle_check = self._loop.call_at(due, self._check_idle)

    def stop_now(self) -> None:
        """Expire at once (shutdown); later calls cannot move the timer back."""
        self._stopped = True
        if self._timer is not None and not self._timer.expired():
            self._timer.reschedule(self._loop.time())

    def expired(self) -> bool:
        """The timer fired (a ``TimeoutError`` inside it is ours, not the backend's)."""
        return self._timer is not None and self._timer.expired()

    def reason(self) -> ExitReason:
        """Which limit ended the exec, once the timer has fired."""
        if self._stopped:
            return "shutdown"
        return "timeout" if self._loop.time() >= self.deadline else "idle_timeout"
