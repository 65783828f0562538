"""Prometheus metrics, in a registry the app owns (no process-global state between apps).

Label values come from fixed sets (outcomes, reasons, streams): never a command, a pod UID or
error text, so cardinality stays bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)


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
            "Wall-clock duration of execs, start to exit event.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("session_proxy_exec_in_flight", "Execs running now.", registry=r)
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
        self.workspace_ready = Gauge(
            "session_proxy_workspace_ready",
            "1 when the exec target is usable, else 0.",
            registry=r,
        )
        self.build_info = Gauge(
            "session_proxy_build_info",
            "Version and backend of this proxy (always 1).",
            ["version", "backend"],
            registry=r,
        )

    def describe_build(self, backend: str) -> None:
        self.build_info.labels(version=__version__, backend=backend).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
