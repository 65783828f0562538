"""Where the API server is and which token to show it, in a cluster.

The projected service-account token is rotated by the kubelet: it is re-read every minute (as
client-go does) and at once after a 401, keeping the previous token if the file is briefly
unreadable.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Final

from .api_errors import ConfigurationError

log = logging.getLogger(__name__)

TOKEN_REFRESH_SECONDS: Final = 60.0


class TokenFile:
    """A projected service-account token: re-read every ``refresh`` seconds, and after a 401."""

    def __init__(
        self,
        path: str,
        refresh: float = TOKEN_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._path = path
        self._on_change = on_change  # called when a read finds another token than the last one
        self._refresh = refresh
        self._clock = clock
        self._token = ""
        self._read_at = float("-inf")

    def current(self) -> str:
        if self._clock() - self._read_at >= self._refresh:
            try:
                with open(self._path, encoding="utf-8") as file:
                    token = file.read().strip()
            except OSError as error:
                if not self._token:
                    raise ConfigurationError(
                        f"cannot read the service-account token file {self._path}: {error.strerror}"
                    ) from None
                log.warning("token file unreadable, keeping the previous token", extra={"path": self._path})
            else:
                changed = bool(self._token) and token != self._token
                self._token = token
                if changed and self._on_change is not None:
                    self._on_change()
            self._read_at = self._clock()
        return self._token

    def expire(self) -> None:
        """Make the next ``current()`` read the file again."""
        self._read_at = float("-inf")


def in_cluster_host() -> str:
    """The API server's URL from the service variables every pod gets."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigurationError(
            "not in a cluster (KUBERNETES_SERVICE_HOST is unset): pass --kubeconfig, or use --backend local"
        )
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"
