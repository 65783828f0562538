"""Where the API server is, a TLS session to it, and which token to show it.

In a pod that is two environment variables, a CA file and a token file: read here with the
standard library and aiohttp alone, so the proxy does not import kubernetes-asyncio's client
package (every generated API model, ~37 MB of RSS) to serve in a cluster. A kubeconfig (exec
plugins, OIDC, client certificates) is ``kubeconfig.py``'s job.

The projected service-account token is rotated by the kubelet: it is re-read every minute (as
client-go does) and at once after a 401, keeping the previous token if the file is briefly
unreadable.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Final, Protocol

import aiohttp

from .api_errors import ConfigurationError

log = logging.getLogger(__name__)

TOKEN_REFRESH_SECONDS: Final = 60.0
# Watch events carry whole objects; etcd allows 1.5 MiB per object (as kubernetes-asyncio sets it).
READ_BUFFER_BYTES: Final = 2 * 1024 * 1024


class ApiAccess(Protocol):
    """What ``KubeApi`` needs to make a call: the server, a session to it, the credentials."""

    @property
    def host(self) -> str: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    async def authorization(self) -> dict[str, str]:
        """The headers that authenticate the next call."""
        ...

    def reread_token(self) -> bool:
        """After a 401: make the next call read the token anew; False if there is nothing to re-read."""
        ...

    async def close(self) -> None: ...


class TokenFile:
    """A projected service-account token: re-read every ``refresh`` seconds, and after a 401."""

    def __init__(
        self, path: str, refresh: float = TOKEN_REFRESH_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._path = path
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
                self._token = token
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


def _api_session(tls: ssl.SSLContext, pool_size: int) -> aiohttp.ClientSession:
    """A session to the API server: ``pool_size`` connections (every exec holds one for its
    life), a proxy from ``HTTPS_PROXY``/``NO_PROXY`` honoured (as client-go and kubeconfig mode do)."""
    connector = aiohttp.TCPConnector(limit=pool_size, ssl=tls)
    return aiohttp.ClientSession(connector=connector, trust_env=True, read_bufsize=READ_BUFFER_BYTES)


class InClusterAccess:
    """The pod's own service account: the service variables, the CA file, the rotated token."""

    def __init__(self, host: str, session: aiohttp.ClientSession, token: TokenFile) -> None:
        self._host = host
        self._session = session
        self._token = token

    @classmethod
    def open(cls, token_file: str, ca_file: str, pool_size: int) -> InClusterAccess:
        """Read what a pod is given; a missing piece stops start-up with what to do about it."""
        host = in_cluster_host()
        token = TokenFile(token_file)
        token.current()
        try:
            tls = ssl.create_default_context(cafile=ca_file)
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"cannot set up TLS to the API server with the CA file {ca_file}: {error}"
            ) from None
        return cls(host, _api_session(tls, pool_size), token)

    @property
    def host(self) -> str:
        return self._host

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    async def authorization(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.current()}"}

    def reread_token(self) -> bool:
        self._token.expire()
        return True

    async def close(self) -> None:
        await self._session.close()
