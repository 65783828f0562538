"""Keeps track of running execs and of clean-up work that outlives a request.

Graceful shutdown needs to know what is running, and killing leftovers after a request has
ended (or after its client vanished) must not be a fire-and-forget task the loop may drop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    def stop(self, reason: str) -> None: ...


class Supervisor:
    def __init__(self) -> None:
        self.draining = False
        self._sessions: set[Stoppable] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def running(self) -> int:
        return len(self._sessions)

    def add(self, session: Stoppable) -> None:
        self._sessions.add(session)
        self._idle.clear()

    def remove(self, session: Stoppable) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._idle.set()

    def spawn(self, coroutine: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run clean-up to completion even though the request that needed it is gone."""
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("clean-up task %s failed", task.get_name(), exc_info=task.exception())

    async def drain(self, grace: float) -> None:
        """Let running execs finish for ``grace`` seconds, then stop the rest (``shutdown``)."""
        self.draining = True
        if self._sessions:
            log.info("draining", extra={"running": len(self._sessions), "grace_s": grace})
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                for session in list(self._sessions):
                    session.stop("shutdown")
                await self._idle.wait()
        await self.wait_background()

    async def wait_background(self) -> None:
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def force(self) -> None:
        """A second signal: stop everything now instead of waiting out the grace."""
        for session in list(self._sessions):
            session.stop("shutdown")
