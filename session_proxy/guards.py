"""Middleware that keeps the exec API for local, non-browser clients, and speaks errors as JSON.

Binding to loopback is not enough (see the README's security model): a browser in the pod can
be aimed at localhost by DNS rebinding or a cross-site request. So the raw ``Host`` header must
name loopback with this listener's port, and anything that looks like a browser is refused.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from .auth import check_bearer
from .errors import (
    BodyTooLarge,
    GuardRefused,
    HttpVersionNotSupported,
    MethodNotAllowed,
    NotFound,
    ProxyError,
)
from .keys import AUTH_TOKEN, METRICS

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]")
# Where OAuth clients look for an authorization server and register (RFC 8414, 9728, 7591).
OAUTH_PATHS: Final = ("/.well-known/oauth-", "/.well-known/openid-", "/register", "/authorize", "/token")
SECURITY_HEADERS: Final = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def error_response(error: ProxyError) -> web.Response:
    return web.json_response(
        {"error": error.detail()},
        status=error.status,
        headers={**SECURITY_HEADERS, **error.headers()},
    )


def _from_http_exception(exception: web.HTTPException, path: str) -> ProxyError:
    if exception.status == 404 and path.startswith(OAUTH_PATHS):
        # An MCP client that met a 401 looks for OAuth here, and shows the user this message.
        return NotFound(
            "session-proxy has no OAuth: send 'Authorization: Bearer <token>' with the token from "
            "the file in SESSION_PROXY_AUTH_TOKEN_FILE"
        )
    if exception.status == 404:
        return NotFound("no such endpoint; see GET /openapi.json for the API")
    if exception.status == 405:
        return method_not_allowed(exception)
    if exception.status == 413:
        return BodyTooLarge("request body is larger than the configured --max-body-bytes")
    return ProxyError(exception.reason, code="http_error", status=exception.status)


def _from_unexpected(exception: Exception) -> ProxyError:
    """A failure nobody expected: a JSON error whose message reveals nothing internal."""
    if isinstance(exception, TimeoutError):
        return ProxyError(
            "the request timed out inside the proxy; retry, and see the proxy's log if it persists",
            code="timed_out",
            status=504,
        )
    return ProxyError(
        f"internal error ({type(exception).__name__}); see the proxy's log", code="internal_error"
    )


def method_not_allowed(exception: web.HTTPException) -> MethodNotAllowed:
    """A 405 that names the methods the path takes, in the body and in ``Allow``."""
    allow = exception.headers.get("Allow", "")
    method = getattr(exception, "method", "this method")
    return MethodNotAllowed(f"{method} is not allowed here; use {allow or 'another method'}", allow=allow)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure before a response started into one JSON error body; count and log it.

    Refusals are logged briefly; an unexpected exception is logged once, with its traceback,
    here and only here (the body never carries one).
    """
    unexpected = False
    try:
        return await handler(request)
    except web.HTTPException as exception:
        error = _from_http_exception(exception, request.path)
    except ProxyError as proxy_error:
        error = proxy_error
    except Exception as exception:
        error, unexpected = _from_unexpected(exception), True
        log.exception("request failed", extra={"status": error.status, "path": request.path})
    request.app[METRICS].rejections.labels(reason=error.code).inc()
    if not unexpected:
        log.info("request refused", extra={"status": error.status, "code": error.code, "path": request.path})
    return error_response(error)


def allowed_hosts(sockname: object) -> frozenset[str] | None:
    """The exact Host values this connection accepts; None for a unix socket (no Host check)."""
    if not isinstance(sockname, tuple):
        return None
    bound, port = str(sockname[0]), int(sockname[1])
    names = set(LOOPBACK_HOSTS)
    try:
        address = ipaddress.ip_address(bound)
    except ValueError:
        pass
    else:
        if not address.is_unspecified:
            names.add(f"[{bound}]" if address.version == 6 else bound)
    return frozenset(f"{name}:{port}" for name in names)


def _check_version(request: web.Request) -> None:
    if request.version.major != 1:
        raise HttpVersionNotSupported(
            f"HTTP/{request.version.major}.{request.version.minor} is not served here; use HTTP/1.1"
        )


def _names_this_listener(target: str, request: web.Request, accepted: frozenset[str] | None) -> bool:
    try:
        parts = urlsplit(target)
    except ValueError:
        return False
    authority = parts.netloc.lower()
    if parts.scheme.lower() != "http" or not authority:
        return False
    if accepted is None:  # a unix socket: the target must agree with Host, as Host is not checked
        return authority == request.headers.get("Host", "").lower()
    return authority in accepted


def _check_target(request: web.Request, accepted: frozenset[str] | None) -> None:
    """An absolute-form target (``POST http://host/exec``) must name this listener too.

    RFC 9112 3.2.2 lets the target's authority override ``Host``, so a foreign authority
    behind a good ``Host`` would be two different requests to two readers.
    """
    target = request.raw_path
    if target.startswith("/") or _names_this_listener(target, request, accepted):
        return
    raise GuardRefused(
        f"request target {target[:100]!r} is not a path on this listener; send origin-form "
        "(POST /exec) with Host set to this loopback address",
        code="bad_target",
    )


def _check_host(request: web.Request, accepted: frozenset[str] | None) -> None:
    if accepted is None:
        return
    # Never request.host: it falls back to the socket address when Host is absent.
    values = request.headers.getall("Host", [])
    if len(values) != 1:
        raise GuardRefused("exactly one Host header is required (e.g. Host: 127.0.0.1:8081)", code="bad_host")
    if values[0].lower() not in accepted:
        raise GuardRefused(
            f"Host {values[0][:100]!r} is not this loopback listener; use one of "
            f"{', '.join(sorted(accepted))} (other names are refused to stop DNS rebinding)",
            code="bad_host",
        )


def _check_not_browser(request: web.Request) -> None:
    """Refuse what only browsers send: ``Origin`` or ``Sec-Fetch-Site``.

    Browsers send ``Origin`` on every cross-origin POST and the four fetch metadata headers
    (``Sec-Fetch-Site``, ``-Mode``, ``-Dest``, ``-User``) together, on every request to a
    loopback URL; so ``Sec-Fetch-Site`` alone marks every browser request that ``Sec-Fetch-*``
    did. Node's ``fetch`` (undici) sends ``Sec-Fetch-Mode: cors`` and nothing else of the
    kind, and must get in: it carries most JavaScript MCP clients.
    """
    if "Origin" in request.headers:
        raise GuardRefused(
            "requests with an Origin header (from a web page) are refused; use curl, the "
            "session-proxy CLI or an HTTP client library",
            code="browser_request",
        )
    if "Sec-Fetch-Site" in request.headers:
        raise GuardRefused(
            "requests with a Sec-Fetch-Site header (from a browser) are refused",
            code="browser_request",
        )


@web.middleware
async def local_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse DNS-rebound, browser-originated and (when configured) unauthenticated requests."""
    transport = request.transport
    accepted = allowed_hosts(transport.get_extra_info("sockname") if transport else None)
    _check_version(request)
    _check_host(request, accepted)
    _check_target(request, accepted)
    _check_not_browser(request)
    token = request.app.get(AUTH_TOKEN, "")
    if token and not _no_such_path(request):
        check_bearer(request.headers.get("Authorization"), token)
    return await handler(request)


def _no_such_path(request: web.Request) -> bool:
    """A path nothing serves answers 404 with or without the token.

    MCP clients that meet a 401 look for OAuth (``/.well-known/oauth-*``, ``/register``);
    a 401 there too would send them into a sign-in flow this proxy does not have, instead of
    telling the user the token is missing.
    """
    return isinstance(request.match_info.http_exception, web.HTTPNotFound)
