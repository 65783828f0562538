"""``/mcp`` on the exec listener: the SDK's Streamable HTTP session manager, in this event loop.

Its server side costs about a third of a second and 15 MB to import (BENCHMARKS.md), so it is loaded on
the first ``/mcp`` request, off the event loop, and a proxy that never sees an MCP client never
pays for it. The session manager then runs in a task of its own until the app shuts down
(``on_shutdown``, before aiohttp waits for open requests, so open MCP streams do not hold
shutdown up). The route sits behind the app's middlewares like ``/exec``: Host check, any
``Origin`` refused, the bearer token when configured.

The tools reach the exec API of this very listener (its bound address, TCP or unix socket, with
the app's token), so each command is an ordinary exec: admitted, counted, logged, and ended as
``client_gone`` when its call is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any, Final

from aiohttp import web

from ..errors import NotReady
from ..keys import AUTH_TOKEN, METRICS
from ..settings import Settings
from .arguments import ToolOptions
from .asgi_bridge import EXCHANGE_CLOSED, AsgiApp, serve_asgi
from .refusals import McpRefusals
from .sdk import import_server_side
from .target import ExecApiTarget

log = logging.getLogger(__name__)
# On shutdown the drain has already ended every exec; POSTs get this long to deliver their results.
RESULT_GRACE: Final = 5.0
SDK_SESSION_LOGGER: Final = "mcp.server.streamable_http_manager"


def exec_api_url(request: web.Request) -> str:
    """The address this request arrived on: the exec listener, as a client URL."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport else None
    if isinstance(sockname, tuple):
        host, port = str(sockname[0]), int(sockname[1])
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if isinstance(sockname, str) and sockname:
        return f"unix:{sockname}"
    raise web.HTTPInternalServerError(text="cannot tell which listener this request came in on")


def _import_sdk() -> tuple[ModuleType, ModuleType]:
    tools, manager = import_server_side("session_proxy.mcp.tools", "mcp.server.streamable_http_manager")
    return tools, manager


class ExchangesInFlight:
    """Counts open POST exchanges, so a shutdown lets them deliver the results the drain produced."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self._count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._count -= 1
            if not self._count:
                self._idle.set()

    async def wait_idle(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)


class McpEndpoint:
    """Loads the SDK and starts its session manager on first use; stops both with the app."""

    def __init__(self, settings: Settings) -> None:
        self._options = ToolOptions(
            workdir=settings.mcp_workdir,
            max_output_chars=settings.mcp_max_output_chars,
            default_timeout=settings.default_timeout,
            max_timeout=settings.max_timeout,
        )
        self._max_body_bytes = settings.max_body_bytes
        self._max_sessions = settings.mcp_max_sessions
        self._session_idle = settings.mcp_session_idle
        self._session_log = SessionLogAtDebug()
        self._asgi: AsgiApp | None = None
        self._target: ExecApiTarget | None = None
        self._manager_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._starting = asyncio.Lock()
        self._posts = ExchangesInFlight()

    @property
    def loaded(self) -> bool:
        return self._asgi is not None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._stop.is_set():
            raise NotReady("the proxy is shutting down", retry_after=5, code="shutting_down")
        app = McpRefusals(
            self._asgi or await self._start(request),
            metrics=request.app[METRICS],
            max_body_bytes=self._max_body_bytes,
            max_sessions=self._max_sessions,
            stream_limit=self._session_idle,
        )
        if request.method != "POST":
            return await serve_asgi(app, request)  # a GET stream: until the client or stream_limit ends it
        with self._posts.track():
            return await serve_asgi(app, request)

    async def _start(self, request: web.Request) -> AsgiApp:
        async with self._starting:
            if self._asgi is not None:
                return self._asgi
            tools, manager_module = await asyncio.to_thread(_import_sdk)
            logging.getLogger(SDK_SESSION_LOGGER).addFilter(self._session_log)
            target = ExecApiTarget(exec_api_url(request), token=request.app[AUTH_TOKEN] or None)
            try:
                server = tools.build_server(target, self._options, exchange_closed=_exchange_closed)
                manager = manager_module.StreamableHTTPSessionManager(
                    app=server,
                    security_settings=None,  # the app's own guards check Host, Origin and the token
                    max_request_body_size=self._max_body_bytes,
                    max_sessions=self._max_sessions,
                    session_idle_timeout=self._session_idle,
                )
                started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                task = asyncio.create_task(self._run(manager, started), name="mcp-session-manager")
                self._manager_task = task
                await started
            except BaseException:
                await target.close()  # a failed start leaves no client behind
                raise
            self._target = target
            self._asgi = manager.handle_request
            log.info("mcp endpoint ready")
            return self._asgi

    async def _run(self, manager: Any, started: asyncio.Future[None]) -> None:
        try:
            async with manager.run():
                started.set_result(None)
                await self._stop.wait()
        except BaseException as error:
            if not started.done():
                started.set_exception(error)
            raise

    async def stop(self) -> None:
        """End every MCP session (their calls are cancelled, ending their commands)."""
        if self._manager_task is not None:
            await self._posts.wait_idle(RESULT_GRACE)
        self._stop.set()
        if self._manager_task is not None:
            await self._manager_task
            self._manager_task = None
        if self._target is not None:
            await self._target.close()
            self._target = None
        logging.getLogger(SDK_SESSION_LOGGER).removeFilter(self._session_log)


class SessionLogAtDebug(logging.Filter):
    """The SDK logs every session's id at info (opened, expired, unknown): per-session detail a
    client can drive, demoted to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _exchange_closed(ctx: Any) -> asyncio.Event | None:
    """The event the bridge sets when the HTTP exchange carrying this call is over."""
    request = getattr(ctx, "request", None)
    scope = getattr(request, "scope", None) or {}
    event = scope.get("extensions", {}).get(EXCHANGE_CLOSED)
    return event if isinstance(event, asyncio.Event) else None


MCP_ENDPOINT = web.AppKey("mcp_endpoint", McpEndpoint)


async def handle_mcp(request: web.Request) -> web.StreamResponse:
    return await request.app[MCP_ENDPOINT].handle(request)


async def _stop_on_shutdown(app: web.Application) -> None:
    await app[MCP_ENDPOINT].stop()


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[MCP_ENDPOINT].stop()  # if shutdown never ran (a failed start-up)


def mount(app: web.Application, settings: Settings) -> None:
    """Add ``/mcp`` (POST, GET, DELETE) to the exec app."""
    app[MCP_ENDPOINT] = McpEndpoint(settings)
    app.on_shutdown.append(_stop_on_shutdown)
    app.cleanup_ctx.append(_lifetime)
    app.router.add_route("*", "/mcp", handle_mcp)
