"""Keeps track of exec requests in flight and of clean-up work that outlives a request.

Graceful shutdown needs to know every exec request, in whatever phase it is (waiting for the
workspace, starting, streaming), and killing leftovers after a request has ended (or after its
client vanished) must not be a fire-and-forget task the loop may drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class StoppableExec(Protocol):
    """An exec request as the supervisor sees it."""

    @property
    def started(self) -> bool:
        """Its command runs: a drain lets it finish within the grace."""

    def stop(self) -> None:
        """End it now with reason ``shutdown``; a command not started yet never starts."""


class Supervisor:
    def __init__(self) -> None:
        self.draining = False
        self._execs: set[StoppableExec] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def in_flight(self) -> int:
        """Exec requests being served, in any phase."""
        return len(self._execs)

    def add(self, exec_run: StoppableExec) -> None:
        self._execs.add(exec_run)
        self._idle.clear()

    def remove(self, exec_run: StoppableExec) -> None:
        self._execs.discard(exec_run)
        if not self._execs:
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

    async def drain(self, grace: float, *, settle: float) -> None:
        """Let running execs finish for ``grace`` seconds, then stop the rest (``shutdown``).

        An exec whose command has not started yet is stopped at once: starting it after the
        drain began would escape the grace. After the stop, requests get ``settle`` seconds to
        end (kill grace plus a moment); the server then cancels what is left.
        """
        self.draining = True
        for exec_run in list(self._execs):
            if not exec_run.started:
                exec_run.stop()
        if self._execs:
            log.info("draining", extra={"running": len(self._execs), "grace_s": grace})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            self.force()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle):
                await self._idle.wait()
                await self.wait_background()

    async def wait_background(self) -> None:
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def force(self) -> None:
        """Stop every exec now (a second signal, or the grace is over)."""
        for exec_run in list(self._execs):
            exec_run.stop()
