"""The time limits of one exec (wall clock, idle, an early stop) as one asyncio timeout.

One timer per exec, moved between the idle and the wall-clock deadline as output arrives:
waiting for output may be cut by either, writing to a slow client by the wall clock only.
Moving a timer costs no allocation, so the per-chunk cost stays a couple of float compares.
"""

from __future__ import annotations

import asyncio

from .models import ExitReason


class ExecDeadline:
    """When an exec must end: ``timeout`` after it arrived, or ``idle`` seconds without output."""

    def __init__(self, arrived: float, timeout: float, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.arrived = arrived  # loop time: the timeout counts from the request's arrival
        self.deadline = arrived + timeout
        self._idle = idle
        self._timer: asyncio.Timeout | None = None
        self._stopped = False

    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return self._loop.time() - self.arrived

    def running(self) -> asyncio.Timeout:
        """The timer to enter around the streaming loop; it raises ``TimeoutError`` on expiry."""
        self._timer = asyncio.timeout_at(self._loop.time() if self._stopped else self.deadline)
        return self._timer

    def awaiting_output(self) -> None:
        """Waiting for the next chunk: the idle deadline applies too."""
        if self._idle and not self._stopped and self._timer is not None:
            self._timer.reschedule(min(self.deadline, self._loop.time() + self._idle))

    def output_arrived(self) -> None:
        """A chunk came: only the wall clock applies while it is written."""
        if self._idle and not self._stopped and self._timer is not None:
            self._timer.reschedule(self.deadline)

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
