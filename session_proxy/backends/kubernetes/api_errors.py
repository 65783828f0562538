"""What can go wrong talking to the Kubernetes API, as types (after kopf's ``APIError`` tree).

    KubeError                 any failed call; ``status`` is the HTTP status, None if unreached
    ├── ConfigurationError    no API server or credentials to be found (at start-up)
    ├── Unauthorized          401: the token was refused, also after re-reading it
    ├── Forbidden             403: RBAC (or the exec handshake) refused
    ├── NotFound              404: the pod (or namespace) does not exist
    ├── Rejected              any other 4xx: the request itself was refused
    └── Unavailable           5xx, 429, unreachable, timed out, not JSON: worth a retry later
        └── ContainerUnavailable  the exec upgrade got 500: the runtime has no such container

``api.py`` raises them; the backend maps them to the proxy's HTTP errors in one function. The
server's message is capped and never carries the token.
"""

from __future__ import annotations

import json
from typing import Final

MESSAGE_LIMIT: Final = 300


class KubeError(Exception):
    """A failed Kubernetes API call."""

    def __init__(self, message: str, *, status: int | None = None, reason: str = "") -> None:
        self.message = message[:MESSAGE_LIMIT]
        super().__init__(self.message)
        self.status = status
        self.reason = reason


class ConfigurationError(KubeError):
    """The proxy cannot find its API server or credentials."""


class Unauthorized(KubeError):
    """401: the API server did not accept the token."""


class Forbidden(KubeError):
    """403: the proxy's Role does not allow this."""


class NotFound(KubeError):
    """404: the object is gone."""


class Rejected(KubeError):
    """Another 4xx: the API server refused the request as made."""


class Unavailable(KubeError):
    """The API server could not answer now (5xx, 429, unreachable, too slow, garbled)."""


class ContainerUnavailable(Unavailable):
    """The exec upgrade got 500: on the v4 path the runtime has no such container (yet)."""


def error_for_status(status: int, message: str, reason: str = "") -> KubeError:
    """The most specific error class for an HTTP status."""
    kind: type[KubeError]
    if status == 401:
        kind = Unauthorized
    elif status == 403:
        kind = Forbidden
    elif status == 404:
        kind = NotFound
    elif status == 429 or status >= 500:
        kind = Unavailable
    else:
        kind = Rejected
    return kind(message or f"HTTP {status}", status=status, reason=reason)


def error_from_body(status: int, body: str, what: str) -> KubeError:
    """The error for a refused call, with the message of its ``Status`` body when it has one."""
    try:
        document = json.loads(body)
        message, reason = str(document.get("message", "")), str(document.get("reason", ""))
    except (ValueError, AttributeError):
        message, reason = body.strip(), ""
    return error_for_status(status, message or f"HTTP {status} for {what}", reason)


def handshake_error(status: int) -> KubeError:
    """A refused exec upgrade: aiohttp drops the body, so say what each status means here."""
    if status == 500:
        return ContainerUnavailable(
            "the workspace container is not running or not found (500)", status=500, reason="Handshake"
        )
    message = {
        400: "the API server refused the exec request (400): is the container name right?",
        401: "the API server rejected the service-account token (401), also after re-reading it",
        403: "exec into the workspace pod is forbidden (403): the proxy's Role needs get and "
        "create on pods/exec",
        404: "the workspace pod no longer exists (404)",
    }.get(status, f"the exec upgrade failed with HTTP {status}")
    return error_for_status(status, message, "Handshake")
