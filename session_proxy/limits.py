"""Admission control: a concurrency cap that fails fast and a leaky-bucket rate limit.

Over the rate, a request may wait up to ``rate_limit_wait`` seconds for capacity (smoothing a
short burst costs the caller a moment instead of a retry), then gets 429 with ``Retry-After``.
A full concurrency cap answers 429 at once: queueing there would hold connections without bound.
A slot is held until the exec's command group is gone, not just until its response ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiolimiter import AsyncLimiter

from .errors import TooManyRequests
from .settings import Settings


class Slot:
    """One admitted exec; releasing twice is harmless."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        if self._on_release is not None:
            self._on_release()
            self._on_release = None


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.max_concurrent = settings.max_concurrent
        self._active = 0
        self.rate_waits = 0  # requests that had to wait for a rate token (then ran or got 429)
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
        slot = Slot(self._release_one)
        try:
            await self._take_rate_token()
        except BaseException:
            slot.release()
            raise
        return slot

    async def take_rate_token(self) -> None:
        """The rate limit alone, for requests with a cap of their own (jobs)."""
        await self._take_rate_token()

    @property
    def active(self) -> int:
        """Slots held now: execs admitted whose command group is not gone yet."""
        return self._active

    def _release_one(self) -> None:
        self._active -= 1

    async def _take_rate_token(self) -> None:
        if self._limiter is None:
            return
        if self._limiter.has_capacity():
            await self._limiter.acquire()
            return
        self.rate_waits += 1
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
