"""Prometheus metrics, in a registry the app owns (no process-global state between apps).

Label values come from fixed sets (outcomes, reasons, streams, verbs): never a command, a pod
UID or error text, so cardinality stays bounded. The series that alerts watch are created at 0
when the app starts: a counter that first appears already at 1 shows no ``increase()``, so the
first failure would be invisible to an alert.

The alerts, recording rules and dashboard in ``manifests/monitoring/`` use these names; the
test suite runs them against a real Prometheus scraping a real proxy.
"""

from __future__ import annotations

from typing import Final, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__
from .models import ExitReason

# Agent commands last from milliseconds (`true`, `cat`) to the 30-minute maximum timeout (builds,
# test suites): buckets spread over that whole range, denser where most commands end.
EXEC_DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800,
)  # fmt: skip
# Request arrival to the `start` event: milliseconds on a warm path, seconds on a cold one, up
# to minutes while a workspace pod pulls its image.
START_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip
# One Kubernetes API call: bounded by --api-timeout (default 10 s).
KUBERNETES_API_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

EXEC_OUTCOMES: Final = (*get_args(ExitReason), "client_gone")
START_PATHS: Final = ("warm", "cold")
# Rejections that mean the agent is throttled, and API errors that mean every command will fail.
THROTTLE_REASONS: Final = ("rate_limited", "concurrency_limit")
CREDENTIAL_ERRORS: Final = ("401", "403")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.exec_requests = Counter(
            "session_proxy_exec_requests",
            "Execs that started, by how they ended (exit reason or client_gone).",
            ["outcome"],
            registry=r,
        )
        self.exec_duration = Histogram(
            "session_proxy_exec_duration_seconds",
            "Wall-clock duration of execs, request arrival to the exit event.",
            buckets=EXEC_DURATION_BUCKETS,
            registry=r,
        )
        self.exec_start_latency = Histogram(
            "session_proxy_exec_start_latency_seconds",
            "Request arrival to the start event, by path (warm: a pre-opened exec; cold: a new one).",
            ["path"],
            buckets=START_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("session_proxy_exec_in_flight", "Execs running now.", registry=r)
        self.in_flight_limit = Gauge(
            "session_proxy_exec_in_flight_limit",
            "The concurrency cap (--max-concurrent): execs past it are refused with 429.",
            registry=r,
        )
        self.output_bytes = Counter(
            "session_proxy_output_bytes",
            "Output bytes forwarded to clients, by stream.",
            ["stream"],
            registry=r,
        )
        self.rejections = Counter(
            "session_proxy_rejections",
            "Requests refused before any command ran, by reason.",
            ["reason"],
            registry=r,
        )
        self.kubernetes_api_errors = Counter(
            "session_proxy_kubernetes_api_errors",
            "Failed Kubernetes API calls, by kind of failure.",
            ["kind"],
            registry=r,
        )
        self.kubernetes_api_duration = Histogram(
            "session_proxy_kubernetes_api_request_duration_seconds",
            "Kubernetes API calls, by verb (list, get; connect: the exec WebSocket handshake).",
            ["verb"],
            buckets=KUBERNETES_API_BUCKETS,
            registry=r,
        )
        self.workspace_ready = Gauge(
            "session_proxy_workspace_ready",
            "1 when the exec target is usable, else 0.",
            registry=r,
        )
        self.warm_execs = Gauge(
            "session_proxy_warm_execs",
            "Warm execs (pre-opened wrapper execs) waiting for a request now.",
            registry=r,
        )
        self.warm_execs_opened = Counter(
            "session_proxy_warm_execs_opened",
            "Warm execs opened (each an exec of the constant wrapper in the API server's audit log).",
            registry=r,
        )
        self.warm_execs_discarded = Counter(
            "session_proxy_warm_execs_discarded",
            "Warm execs closed unused, by reason (max_age, idle, pod_replaced, closed, silent, ...).",
            ["reason"],
            registry=r,
        )
        self.build_info = Gauge(
            "session_proxy_build_info",
            "Version and backend of this proxy (always 1).",
            ["version", "backend"],
            registry=r,
        )
        self.processes_survived_kill = Counter(
            "session_proxy_processes_survived_kill",
            "Processes of a local command still alive after KILL (each is also logged).",
            registry=r,
        )
        self.jobs_running = Gauge(
            "session_proxy_jobs_running", "Background jobs whose command group is not gone yet.", registry=r
        )
        self.jobs = Counter(
            "session_proxy_jobs",
            "Background jobs that ended, by how (an exit reason, or killed: ended by request).",
            ["outcome"],
            registry=r,
        )
        self.job_output_dropped_bytes = Counter(
            "session_proxy_job_output_dropped_bytes",
            "Job output bytes that fell out of a job's ring (--job-output-bytes), by stream.",
            ["stream"],
            registry=r,
        )
        for outcome in (*get_args(ExitReason), "killed"):
            self.jobs.labels(outcome=outcome)
        for stream in ("stdout", "stderr"):
            self.job_output_dropped_bytes.labels(stream=stream)
        self._create_watched_series()

    def _create_watched_series(self) -> None:
        for outcome in EXEC_OUTCOMES:
            self.exec_requests.labels(outcome=outcome)
        for path in START_PATHS:
            self.exec_start_latency.labels(path=path)
        for stream in ("stdout", "stderr"):
            self.output_bytes.labels(stream=stream)
        for reason in THROTTLE_REASONS:
            self.rejections.labels(reason=reason)
        for kind in CREDENTIAL_ERRORS:
            self.kubernetes_api_errors.labels(kind=kind)

    def describe_build(self, backend: str) -> None:
        self.build_info.labels(version=__version__, backend=backend).set(1)

    def observe_kubernetes_api(self, verb: str, seconds: float) -> None:
        self.kubernetes_api_duration.labels(verb=verb).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
