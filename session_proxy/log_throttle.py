"""A logging filter that bounds how fast one kind of message can be logged.

Some messages are triggered by the network, not by the proxy: one per malformed request, and
asyncio's ``socket.accept() out of system resource``, which at fd exhaustion is logged once per
queued connection on every retry (a storm that reached 109 MB in 42 s). Each kind of message
(logger and format string) gets a token bucket: a burst passes, then ``rate`` per second; the
next message that passes says how many were dropped (``suppressed``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

# Loggers whose volume a client can drive: the asyncio accept loop, aiohttp's connection
# handling, the parse-error answers, the guards' refusals and those on /mcp (the SDK's own too).
NETWORK_DRIVEN_LOGGERS: Final = (
    "asyncio",
    "aiohttp.server",
    "session_proxy.http_protocol",
    "session_proxy.guards",
    "session_proxy.mcp.refusals",
    "mcp.server.streamable_http_manager",
)
MAX_KINDS: Final = 1024


@dataclass
class _Bucket:
    tokens: float
    updated: float
    dropped: int = 0


class LogThrottle(logging.Filter):
    def __init__(
        self, *, rate: float = 1.0, burst: int = 10, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        # The first line of the format string names the kind (asyncio's carries a socket repr after it).
        key = (record.name, str(record.msg).partition("\n")[0][:200])
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_KINDS:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(tokens=self._burst, updated=now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens < 1:
            bucket.dropped += 1
            return False
        bucket.tokens -= 1
        if bucket.dropped:
            record.suppressed = bucket.dropped
            bucket.dropped = 0
        return True

    def install(self, names: Iterable[str] = NETWORK_DRIVEN_LOGGERS) -> None:
        for name in names:
            logging.getLogger(name).addFilter(self)

    def uninstall(self, names: Iterable[str] = NETWORK_DRIVEN_LOGGERS) -> None:
        for name in names:
            logging.getLogger(name).removeFilter(self)
