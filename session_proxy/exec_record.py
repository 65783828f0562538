"""What one exec reports when it ends: its metrics and its one log line, written exactly once."""

from __future__ import annotations

import logging
from typing import Any

from .backends.base import ExecSpec, ExitStatus
from .logs import argv_digest
from .metrics import Metrics

# The exec log line keeps the logger name users filter on (it was born in streaming.py).
log = logging.getLogger("session_proxy.streaming")


class ExecRecord:
    """Byte counts, outcome and status of one exec, and the single place they are reported.

    An exec counts once its command started or its response began (a ``waiting`` event): a
    request refused before either is a rejection, counted by the error middleware instead.
    """

    def __init__(self, spec: ExecSpec, metrics: Metrics) -> None:
        self._spec = spec
        self._metrics = metrics
        self.output_counters = {
            stream: metrics.output_bytes.labels(stream=stream) for stream in ("stdout", "stderr")
        }
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.truncated = False
        self.outcome = "error"
        self.status: ExitStatus | None = None
        self.target = ""  # set once the command started
        self.warm = False  # it started on a pre-opened (warm) exec
        self._written = False

    @property
    def total_bytes(self) -> int:
        return self.stdout_bytes + self.stderr_bytes

    def started(self, target: str, *, warm: bool = False) -> None:
        """The command runs: it is in flight until the record is written."""
        self.target = target
        self.warm = warm
        self._metrics.in_flight.inc()

    def start_sent(self, seconds: float) -> None:
        """The ``start`` event goes out ``seconds`` after the request arrived."""
        path = "warm" if self.warm else "cold"
        self._metrics.exec_start_latency.labels(path=path).observe(seconds)

    def write(self, duration: float, *, answered: bool) -> None:
        """Count the exec and log its line; every call after the first does nothing.

        ``answered``: the response began (see the class docstring for what counts).
        """
        if self._written or not (self.target or answered):
            return
        self._written = True
        if self.target:
            self._metrics.in_flight.dec()
        self._metrics.exec_requests.labels(outcome=self.outcome).inc()
        self._metrics.exec_duration.observe(duration)
        status = self.status
        extra: dict[str, Any] = {
            "exec_id": self._spec.exec_id,
            "target": self.target,
            "argv_sha256": argv_digest(self._spec.argv),
            "duration_ms": int(duration * 1000),
            "exit_code": status.exit_code if status else None,
            "signal": status.signal if status else None,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
            "truncated": self.truncated,
            "outcome": self.outcome,
            "warm": self.warm,
        }
        if log.isEnabledFor(logging.DEBUG):
            extra["argv"] = self._spec.argv
        log.info("exec finished", extra=extra)
