"""Typed keys for what the aiohttp applications share (no module-level state)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .backends.base import ExecBackend
from .jobs.registry import JobRegistry
from .limits import Admission
from .metrics import Metrics
from .settings import Settings
from .supervisor import Supervisor

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", ExecBackend)
METRICS = web.AppKey("metrics", Metrics)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
ADMISSION = web.AppKey("admission", Admission)
EXEC_APP = web.AppKey("exec_app", web.Application)
AUTH_TOKEN = web.AppKey("auth_token", str)  # empty: no token required
JOBS = web.AppKey("jobs", JobRegistry)
# prometheus_client's own exposition handler (content negotiation, compression) for one registry.
METRICS_HANDLER = web.AppKey[Handler]("metrics_handler")
