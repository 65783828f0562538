"""Admission control: a concurrency cap that fails fast and a leaky-bucket rate limit.

Over the rate, a request may wait up to ``rate_limit_wait`` seconds for capacity (smoothing a
short burst costs the caller a moment instead of a retry), then gets 429 with ``Retry-After``.
A full concurrency cap answers 429 at once: queueing there would hold connections without bound.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

from .errors import TooManyRequests
from .settings import Settings


class Slot:
    """One admitted exec; releasing twice is harmless."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._active -= 1
            self._admission = None


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.max_concurrent = settings.max_concurrent
        self._active = 0
        self._wait = settings.rate_limit_wait
        self._limiter: AsyncLimiter | None = None
        self._retry_after = 1.0
        if settings.rate_limit > 0:
            period = settings.rate_burst / settings.rate_limit
            self._limiter = AsyncLimiter(settings.rate_burst, period)
            self._retry_after = 1 / settings.rate_limit

    async def admit(self) -> Slot:
        """Take a concurrency slot, then a rate token; raise ``TooManyRequests`` if either is short."""
        if self._active >= self.max_concurrent:
            raise TooManyRequests(
                f"{self._active} execs are running, the configured maximum "
                f"(--max-concurrent {self.max_concurrent}); retry when one has finished",
                retry_after=1,
                code="concurrency_limit",
            )
        self._active += 1
        slot = Slot(self)
        try:
            await self._take_rate_token()
        except BaseException:
            slot.release()
            raise
        return slot

    async def _take_rate_token(self) -> None:
        if self._limiter is None:
            return
        if self._limiter.has_capacity():
            await self._limiter.acquire()
            return
        try:
            async with asyncio.timeout(self._wait):
                await self._limiter.acquire()
        except TimeoutError:
            raise TooManyRequests(
                "request rate is over the configured limit (--rate-limit per second, "
                "--rate-burst at once); slow down and retry after the indicated time",
                retry_after=self._retry_after,
                code="rate_limited",
            ) from None
