"""Application factories: routes, shared components and their lifetimes. No I/O here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from . import auth, handlers
from .backends.base import ExecBackend
from .guards import SECURITY_HEADERS, json_errors, local_only
from .jobs import handlers as job_handlers
from .jobs.registry import JobRegistry
from .keys import (
    ADMISSION,
    AUTH_TOKEN,
    BACKEND,
    EXEC_APP,
    JOBS,
    METRICS,
    METRICS_HANDLER,
    SETTINGS,
    SUPERVISOR,
)
from .limits import Admission
from .mcp import http as mcp_http
from .metrics import Metrics
from .settings import Settings
from .supervisor import Supervisor

CLEANUP_SLACK: Final = 2.0


class StartupFailed(Exception):
    """The proxy cannot start as configured: the backend cannot be built or opened, or the
    auth token file cannot be read. The message says what to fix."""


def build_backend(settings: Settings, metrics: Metrics) -> ExecBackend:
    if settings.backend == "local":
        from .backends.local import LocalBackend

        return LocalBackend(settings.local_root, metrics)
    from .backends.kubernetes import KubernetesBackend

    try:
        return KubernetesBackend(settings, metrics)
    except ValueError as error:
        raise StartupFailed(str(error)) from None


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    # The rate limiter binds to the running loop, so it is made here, not at import or build.
    app[ADMISSION] = Admission(app[SETTINGS])
    token_file = app[SETTINGS].auth_token_file
    try:
        app[AUTH_TOKEN] = auth.load_or_create(token_file) if token_file else ""
    except (OSError, ValueError) as error:
        raise StartupFailed(f"auth_token_file: {error}") from error
    try:
        await app[BACKEND].open()
    except Exception as error:
        await app[BACKEND].close()
        raise StartupFailed(f"backend {app[BACKEND].name}: {error}") from error
    yield
    # Clean-up tasks end within the kill grace; a stuck one must not hold the exit for ever.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(app[SETTINGS].kill_grace + CLEANUP_SLACK):
            await app[SUPERVISOR].wait_background()
    await app[BACKEND].close()


async def _jobs_lifetime(app: web.Application) -> AsyncIterator[None]:
    # Cleaned up before the backend closes: every job ends (shutdown) while it can still kill.
    app[JOBS] = JobRegistry(app[SETTINGS], app[BACKEND], app[METRICS])
    yield
    await app[JOBS].close()


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff`` on every answer.

    The hook runs inside ``prepare``, before the headers are sent (``response.prepared`` is
    already true there, so it cannot serve as a guard).
    """
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def create_app(
    settings: Settings,
    *,
    backend: ExecBackend | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The exec API (loopback only)."""
    app = web.Application(
        middlewares=[json_errors, local_only],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[BACKEND] = backend or build_backend(settings, app[METRICS])
    app[SUPERVISOR] = Supervisor()
    app[METRICS].describe_build(app[BACKEND].name)
    app[METRICS].in_flight_limit.set(settings.max_concurrent)
    app.cleanup_ctx.append(_lifetime)
    app.cleanup_ctx.append(_jobs_lifetime)
    app.on_response_prepare.append(_add_security_headers)
    app.router.add_post("/exec", handlers.post_exec)
    app.router.add_get("/status", handlers.get_status)
    app.router.add_get("/logs", handlers.get_logs)
    app.router.add_get("/healthz", handlers.get_healthz)
    app.router.add_get("/openapi.json", handlers.get_openapi)
    job_handlers.add_routes(app.router)
    mcp_http.mount(app, settings)
    return app


def create_ops_app(exec_app: web.Application) -> web.Application:
    """Metrics and probes (pod IP): shares the exec app's components, runs nothing."""
    app = web.Application(middlewares=[json_errors])
    app[EXEC_APP] = exec_app
    app[METRICS] = exec_app[METRICS]
    app[METRICS_HANDLER] = make_aiohttp_handler(app[METRICS].registry)
    app.router.add_get("/metrics", handlers.get_metrics)
    app.router.add_get("/healthz", handlers.get_healthz)
    app.router.add_get("/readyz", handlers.get_readyz)
    return app
