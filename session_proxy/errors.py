"""Errors the proxy raises before a response starts; each knows its HTTP status and code.

    ProxyError
    ├── MalformedRequest        400 malformed_request
    ├── Unauthorized            401 unauthorized (with --auth-token-file)
    ├── GuardRefused            403 forbidden
    ├── NotFound                404 not_found
    ├── MethodNotAllowed        405 method_not_allowed (with Allow)
    ├── RequestTimeout          408 body_timeout
    ├── BodyTooLarge            413 body_too_large
    ├── UnsupportedMediaType    415 unsupported_media_type
    ├── InvalidRequest          422 invalid_request (with the invalid fields)
    ├── TooManyRequests         429 rate_limited | concurrency_limit (with Retry-After)
    ├── BackendFailure          502 backend_error
    ├── NotReady                503 not_ready | shutting_down (with Retry-After)
    └── HttpVersionNotSupported 505 http_version

Errors after streaming has started travel in-band, as the final ``exit`` event.
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def detail(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    def headers(self) -> dict[str, str]:
        return {}


class MalformedRequest(ProxyError):
    status = 400
    code = "malformed_request"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="session-proxy"'}


class GuardRefused(ProxyError):
    status = 403
    code = "forbidden"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str = "") -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        # RFC 9110 15.5.6: a 405 MUST say which methods the resource takes.
        return {"Allow": self.allow} if self.allow else {}


class RequestTimeout(ProxyError):
    status = 408
    code = "body_timeout"


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "unsupported_media_type"


class InvalidRequest(ProxyError):
    status = 422
    code = "invalid_request"

    def __init__(self, message: str, fields: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.fields = fields

    def detail(self) -> dict[str, Any]:
        return {**super().detail(), "fields": self.fields}


class _RetryableError(ProxyError):
    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def detail(self) -> dict[str, Any]:
        return {**super().detail(), "retry_after": self.retry_after}

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; round up so a client never retries too early.
        return {"Retry-After": str(max(1, -int(-self.retry_after // 1)))}


class TooManyRequests(_RetryableError):
    status = 429
    code = "rate_limited"


class BackendFailure(ProxyError):
    status = 502
    code = "backend_error"


class NotReady(_RetryableError):
    status = 503
    code = "not_ready"


class HttpVersionNotSupported(ProxyError):
    status = 505
    code = "http_version"
