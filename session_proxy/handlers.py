"""HTTP handlers: thin, they check the request and hand over to ``ExecRun``."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from aiohttp import HttpVersion11, web
from pydantic import ValidationError

from . import __version__
from .backends.base import ExecSpec
from .errors import (
    BodyTooLarge,
    HttpVersionNotSupported,
    InvalidRequest,
    MalformedRequest,
    RequestTimeout,
    UnsupportedMediaType,
)
from .keys import ADMISSION, BACKEND, EXEC_APP, JOBS, METRICS, METRICS_HANDLER, SETTINGS, SUPERVISOR
from .models import ExecRequest, RequestJsonError, load_request_json
from .openapi import openapi_document
from .settings import Settings
from .streaming import ExecRun, shutting_down


def _check_content(request: web.Request) -> None:
    if request.headers.get("Content-Encoding"):
        raise UnsupportedMediaType(
            "Content-Encoding is not accepted; send the JSON body uncompressed",
            code="content_encoding",
        )
    transfer_coding = request.headers.get("Transfer-Encoding", "chunked").strip().lower()
    if transfer_coding != "chunked":
        raise UnsupportedMediaType(
            f"Transfer-Encoding {transfer_coding[:50]!r} is not accepted; only chunked (or none)",
            code="transfer_encoding",
        )
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type!r}",
        )


def _check_streamable(request: web.Request) -> None:
    # The event stream is chunked, which HTTP/1.0 does not have: refuse before anything starts.
    if request.version != HttpVersion11:
        raise HttpVersionNotSupported(
            f"POST /exec streams its answer with chunked transfer coding, which needs HTTP/1.1; "
            f"this request is HTTP/{request.version.major}.{request.version.minor} "
            "(curl: drop -0/--http1.0)"
        )


async def _read_body(request: web.Request, settings: Settings) -> bytes:
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit} "
            "(--max-body-bytes); send large input some other way"
        )
    try:
        # A body that never arrives must not hold the connection (and shutdown) for ever.
        async with asyncio.timeout(settings.body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"request body is over the limit of {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {settings.body_timeout:g} s (--body-timeout)"
        ) from None


def _field_name(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "(body)"


def parse_exec_request(body: bytes, settings: Settings, *, max_timeout: float | None = None) -> ExecRequest:
    """Validate a body; 400 if it is not strict JSON, 422 naming each invalid field otherwise.

    ``max_timeout``: the largest ``timeout`` allowed, if not ``--max-timeout`` (a job's is longer).
    """
    try:
        document = load_request_json(body)
    except RequestJsonError as error:
        raise MalformedRequest(str(error)) from None
    try:
        return ExecRequest.model_validate(
            document, strict=True, context={"max_timeout": max_timeout or settings.max_timeout}
        )
    except ValidationError as error:
        problems = error.errors(include_url=False)
        fields = [
            {
                "field": _field_name(problem["loc"]),
                "reason": str(problem["msg"]).removeprefix("Value error, "),
            }
            for problem in problems
        ]
        summary = "; ".join(f"{f['field']}: {f['reason']}" for f in fields)
        raise InvalidRequest(f"invalid request: {summary}", fields) from None


def exec_spec(exec_request: ExecRequest, *, default_timeout: float, arrived: float) -> ExecSpec:
    """What a backend runs for a validated request (an exec or a job), under a new exec id."""
    return ExecSpec(
        exec_id=secrets.token_hex(8),
        argv=exec_request.command,
        workdir=exec_request.workdir,
        env=exec_request.env,
        stdin=exec_request.stdin_bytes(),
        timeout=exec_request.timeout or default_timeout,
        arrived=arrived,
    )


async def post_exec(request: web.Request) -> web.StreamResponse:
    arrived = asyncio.get_running_loop().time()
    app = request.app
    settings = app[SETTINGS]
    supervisor = app[SUPERVISOR]
    _check_streamable(request)
    if supervisor.draining:
        raise shutting_down()
    _check_content(request)
    exec_request = parse_exec_request(await _read_body(request, settings), settings)
    slot = await app[ADMISSION].admit()
    try:  # from here on the run holds the slot until the command's group is gone
        spec = exec_spec(exec_request, default_timeout=settings.default_timeout, arrived=arrived)
        run = ExecRun(
            request,
            spec,
            backend=app[BACKEND],
            settings=settings,
            metrics=app[METRICS],
            supervisor=supervisor,
            slot=slot,
        )
    except BaseException:
        slot.release()
        raise
    return await run.run()


async def status_document(app: web.Application) -> dict[str, Any]:
    info = await app[BACKEND].info()
    settings = app[SETTINGS]
    return {
        "version": __version__,
        "backend": info.name,
        "ready": info.ready,
        "in_flight": app[SUPERVISOR].in_flight,
        "max_concurrent": settings.max_concurrent,
        "jobs_running": app[JOBS].running,
        "max_jobs": settings.max_jobs,
        "draining": app[SUPERVISOR].draining,
        "target": info.target,
    }


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(await status_document(request.app))


MAX_LOG_LINES = 10_000


def parse_tail(text: str) -> int:
    """``tail`` as a line count: ASCII digits only (``str.isdigit`` also takes '²'), bounded."""
    if not (text.isascii() and text.isdigit() and len(text) <= 6 and int(text) <= MAX_LOG_LINES):
        raise InvalidRequest(
            f"tail must be a whole number from 0 to {MAX_LOG_LINES}",
            [{"field": "tail", "reason": f"must be 0..{MAX_LOG_LINES}"}],
        )
    return int(text)


async def get_logs(request: web.Request) -> web.Response:
    log_text = await request.app[BACKEND].logs(parse_tail(request.query.get("tail", "100")))
    return web.Response(text=log_text, content_type="text/plain")


async def get_healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_openapi(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        openapi_document(settings.max_timeout, settings.default_timeout, settings.max_job_duration)
    )


# Ops listener: reachable from the pod network, so nothing here runs commands or shows data.


async def get_metrics(request: web.Request) -> web.StreamResponse:
    exec_app = request.app[EXEC_APP]
    info = await exec_app[BACKEND].info()
    metrics = exec_app[METRICS]
    metrics.workspace_ready.set(1 if info.ready else 0)
    return await request.app[METRICS_HANDLER](request)


async def get_readyz(request: web.Request) -> web.Response:
    exec_app = request.app[EXEC_APP]
    if exec_app[SUPERVISOR].draining:
        return web.json_response({"status": "draining"}, status=503)
    info = await exec_app[BACKEND].info()
    if not info.ready:
        return web.json_response({"status": "not_ready"}, status=503)
    return web.json_response({"status": "ready"})
