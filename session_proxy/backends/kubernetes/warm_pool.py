"""Warm execs: wrapper execs opened before a request needs them (issue 12).

The wrapper reads its whole header from stdin before it does anything, so an exec opened early
simply waits in ``read``; a request then costs one header write and one fork instead of an
exec handshake. If its stdin ends while it waits (the proxy closed it, or died), the read fails
and the script exits: an unused warm exec leaves nothing running in the workspace.

The pool belongs to one pod uid: a request for another pod closes every warm exec of the old
one, unused. It opens on the first request, not at start-up, and closes everything after
``warm_exec_idle`` seconds without requests, so an idle session holds nothing. A warm exec
older than ``warm_exec_max_age`` is replaced; one whose stream ended, went quiet (its pings
unanswered) or printed before its header is discarded and replaced after a backoff. A refused
open (403, 5xx, a pod that cannot be exec'd) pauses refilling until a request finds the pod
usable again and the backoff is over, so a failing API server sees no hot loop and the log
one line per pause.

A warm exec is handed out only if its peer was heard from within ``warm_exec_fresh`` seconds
(its open, a pong) or answers a ping then (a peer that died without a reset would take the
header and run nothing), and is the request's only once its header is
written: a request that ends before that (cancelled) closes it, so nothing it could have
started is left running. An exec is opened by pod name, so one opened after the pod was
replaced under the same name lands in the new pod: the opener then raises
``WorkspaceReplaced`` and the pool lets go of the old uid. Warm execs opened with credentials
that may have lost their rights (the token file changed, a call answered 401 or 403) are closed.

A warm exec taken by a request is replaced once that request has ended (its exit event sent),
so the replacement's handshake and spawn do not compete with the command it stands in for;
only a pool that would otherwise be empty is refilled at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from ...metrics import Metrics
from ...settings import Settings
from ...tasks import cancel_and_wait
from .api_errors import KubeError
from .discovery import Workspace
from .exec_stream import ExecStream

log = logging.getLogger(__name__)

DiscardReason = Literal[
    "pod_replaced",
    "idle",
    "max_age",
    "closed",
    "silent",
    "unexpected_output",
    "write_failed",
    "shutdown",
    "abandoned",
    "credentials",
]
DISCARD_REASONS: Final[tuple[DiscardReason, ...]] = (
    "pod_replaced", "idle", "max_age", "closed", "silent", "unexpected_output", "write_failed", "shutdown",
    "abandoned", "credentials",
)  # fmt: skip
# After a refused open or a warm exec that died, the next open waits 1 s, 2 s, 4 s ... 60 s.
BACKOFF_FIRST: Final = 1.0
BACKOFF_MAX: Final = 60.0
# How long a warm exec may take to answer the ping that proves it alive before its header (at
# most the ping timeout); past that the request goes cold (a new exec costs less than a header
# sent into a dead connection). Generous: a busy loop must not make live warm execs look dead.
LIVENESS_TIMEOUT: Final = 5.0

WarmOpener = Callable[[Workspace, str], Awaitable[ExecStream]]


class WorkspaceReplaced(Exception):
    """The warm exec just opened by the pod's name landed in another pod (another uid)."""


@dataclass(eq=False)
class WarmExec:
    """One pre-opened wrapper exec, waiting for its header."""

    warm_id: str  # in the exec's User-Agent, so the API server's audit log can be joined
    stream: ExecStream
    opened_at: float
    watcher: asyncio.Task[None] | None = None


class WarmPool:
    def __init__(self, settings: Settings, metrics: Metrics, opener: WarmOpener) -> None:
        self._size = settings.warm_execs
        self._idle = settings.warm_exec_idle
        self._max_age = settings.warm_exec_max_age
        self._liveness_timeout = min(LIVENESS_TIMEOUT, settings.exec_ping_timeout)
        self._fresh = settings.warm_exec_fresh
        self._metrics = metrics
        self._opener = opener
        self._loop = asyncio.get_running_loop()
        self._workspace: Workspace | None = None
        self._ready: list[WarmExec] = []
        self._opening = 0
        self._in_use = 0  # handed out and not released yet: their replacements wait
        self._last_request = 0.0
        self._failures = 0  # consecutive refused opens and early deaths
        self._retry_at = 0.0
        self._refused = False  # paused until a request finds the pod usable (and the backoff ends)
        self._wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # ---- the request side ----------------------------------------------------------------

    async def take(self, workspace: Workspace, header: bytes, exec_id: str) -> ExecStream | None:
        """A warm exec of ``workspace`` (which discovery just found usable) that answered a ping
        just now, with ``header`` written to it; or None: go cold. Either way the pool is
        (re)bound to the workspace and refilled in the background. Until the header is written
        nothing can have run, so a warm exec found dead by then costs only a new exec."""
        warm = await self._take_live(workspace)
        if warm is None:
            return None
        try:
            written = await warm.stream.send_stdin(header)
        except BaseException:
            # Cancelled mid-header: closing it is stdin EOF, which ends whatever it started.
            self.discard(warm, "abandoned")
            self.released()
            raise
        if not written:
            self.discard(warm, "write_failed")
            self.released()
            return None
        self._failures = 0  # the exec is the request's now; the pool works again
        log.debug("exec on a warm exec", extra={"exec_id": exec_id, "warm_exec": warm.warm_id})
        return warm.stream

    async def _take_live(self, workspace: Workspace) -> WarmExec | None:
        if self._closed:
            return None
        now = self._loop.time()
        self._last_request = now
        if self._workspace is None or self._workspace.uid != workspace.uid:
            self._discard_all("pod_replaced")
            self._workspace, self._failures, self._retry_at, self._refused = workspace, 0, 0.0, False
        elif self._refused and now >= self._retry_at:
            self._refused = False
        self._ensure_keeper()
        self._wake.set()
        # Only the execs ready now are tried: one the keeper opens meanwhile would be another
        # wait for this request. A silent one ends the search, as its ping took the full timeout.
        for warm in list(self._ready):
            if warm not in self._ready:
                continue  # discarded meanwhile (its age, a new token)
            self._ready.remove(warm)
            self._in_use += 1  # handed out: its replacement waits until it is released
            self._set_gauge()
            try:
                unusable = await self._why_unusable(warm)
            except BaseException:
                self.discard(warm, "abandoned")  # the request is gone (cancelled): nothing ran
                self.released()
                raise
            if unusable is None:
                return warm
            self.discard(warm, unusable)
            self.released()
            if unusable == "silent":
                break
        return None

    async def _why_unusable(self, warm: WarmExec) -> DiscardReason | None:
        """None if ``warm`` was heard from just before (its open, a pong) or answers a ping now
        (its watcher stopped); else why not."""
        if warm.watcher is not None:
            await cancel_and_wait(warm.watcher)
        stream = warm.stream
        if not stream.ended and (
            stream.heard_within(self._fresh) or await stream.answers_ping(self._liveness_timeout)
        ):
            return None
        if stream.peer_silent:
            return "silent"
        return "closed" if stream.ended else "unexpected_output"

    def released(self) -> None:
        """A warm exec that ``take`` handed out is done with (its request ended, or it could
        not be used): its replacement may open now."""
        self._in_use -= 1
        self._wake.set()

    def discard(self, warm: WarmExec, reason: DiscardReason) -> None:
        """Close a warm exec unused (stdin EOF: the waiting wrapper exits) and count why."""
        if warm in self._ready:
            self._ready.remove(warm)
            self._set_gauge()
        self._metrics.warm_execs_discarded.labels(reason=reason).inc()
        if warm.watcher is not None and warm.watcher is not asyncio.current_task():
            warm.watcher.cancel()
        task = asyncio.create_task(warm.stream.close(), name=f"warm-exec-close-{warm.warm_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ---- status and shutdown -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        now = self._loop.time()
        return {
            "size": self._size,
            "ready": len(self._ready),
            "opening": self._opening,
            "pod": self._workspace.name if self._workspace else None,
            "pod_uid": self._workspace.uid if self._workspace else None,
            "paused": self._refused,
            "oldest_age_seconds": round(max((now - w.opened_at for w in self._ready), default=0.0), 1),
        }

    def drop_credentials(self) -> None:
        """The credentials the warm execs were opened with may have lost their rights: close
        them all unused (refills use the credentials of now)."""
        self._discard_all("credentials")
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        try:
            if self._keeper is not None:
                await cancel_and_wait(self._keeper)
        finally:
            self._discard_all("shutdown")
            if self._closing:
                await asyncio.gather(*self._closing, return_exceptions=True)

    # ---- the background side -------------------------------------------------------------

    def _ensure_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name="warm-pool-keeper")

    async def _keep(self) -> None:
        """Fill the pool, replace old warm execs, and close them all once requests stop."""
        while not self._closed and self._workspace is not None:
            self._wake.clear()
            now = self._loop.time()
            if now - self._last_request >= self._idle:
                self._discard_all("idle")
                self._workspace = None  # the next request binds and opens again
                return
            for warm in [w for w in self._ready if now - w.opened_at >= self._max_age]:
                self._failures = 0  # it lived its full age: not a failure
                self.discard(warm, "max_age")
            if self._wanted() and not self._refused and now >= self._retry_at:
                try:
                    await self._open_one(self._workspace)
                except Exception:  # not the API's refusal: say so, back off, keep the pool going
                    self._note_failure()
                    log.warning("warm exec open failed", exc_info=True)
                continue
            await self._sleep_until(self._next_deadline(now))

    def _next_deadline(self, now: float) -> float:
        deadlines = [self._last_request + self._idle]
        deadlines += [w.opened_at + self._max_age for w in self._ready]
        if not self._refused and self._wanted():
            deadlines.append(self._retry_at)
        return max(now, min(deadlines))

    def _wanted(self) -> int:
        """Warm execs to open now: the pool's shortfall, less the replacements of requests still
        running, unless the pool would be empty."""
        missing = self._size - len(self._ready) - self._opening
        if not self._ready and not self._opening:
            return missing
        return max(0, missing - self._in_use)

    async def _sleep_until(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._wake.wait()

    async def _open_one(self, workspace: Workspace) -> None:
        warm_id = secrets.token_hex(6)
        self._opening += 1
        try:
            stream = await self._opener(workspace, warm_id)
        except KubeError as error:
            self._refuse(error)
            return
        except WorkspaceReplaced:
            # The name now holds another pod: let go of the old uid; a request binds the new one.
            self._metrics.warm_execs_discarded.labels(reason="pod_replaced").inc()
            if self._workspace is not None and self._workspace.uid == workspace.uid:
                self._discard_all("pod_replaced")
                self._workspace = None
            return
        finally:
            self._opening -= 1
        self._metrics.warm_execs_opened.inc()
        warm = WarmExec(warm_id, stream, self._loop.time())
        if self._closed or self._workspace is None or self._workspace.uid != workspace.uid:
            self.discard(warm, "pod_replaced" if not self._closed else "shutdown")
            return
        warm.watcher = asyncio.create_task(self._watch(warm), name=f"warm-exec-watch-{warm_id}")
        self._ready.append(warm)
        self._set_gauge()

    async def _watch(self, warm: WarmExec) -> None:
        """Read the idle stream: the wrapper says nothing before its header, so any frame, the
        stream's end, or unanswered pings (``ExecStream.receive`` gives up) mean it is lost."""
        frame = await warm.stream.receive()
        if frame is not None:
            reason: DiscardReason = "unexpected_output"
        else:
            reason = "silent" if warm.stream.peer_silent else "closed"
        self._note_failure()
        self.discard(warm, reason)
        self._wake.set()

    def _refuse(self, error: KubeError) -> None:
        self._note_failure()
        if not self._refused:
            log.warning(
                "warm exec refused; the pool pauses until the workspace is usable again",
                extra={"error": str(error)[:300], "retry_in_seconds": self._retry_at - self._loop.time()},
            )
        self._refused = True

    def _note_failure(self) -> None:
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        self._retry_at = self._loop.time() + delay

    def _discard_all(self, reason: DiscardReason) -> None:
        for warm in list(self._ready):
            self.discard(warm, reason)

    def _set_gauge(self) -> None:
        self._metrics.warm_execs.set(len(self._ready))
