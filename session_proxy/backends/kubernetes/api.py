"""The only module that talks to the Kubernetes API, and the only importer of kubernetes_asyncio.

kubernetes_asyncio supplies the configuration (in-cluster or kubeconfig) and the TLS-configured
HTTP session; requests are made here so that the token is under our control: it is re-read
from its file every minute, and once more after a 401 before a request fails (kubernetes_asyncio
itself never re-reads on 401). Its errors become ``KubeApiError``, with the server's text capped
and never the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Final
from urllib.parse import quote, urlencode

import aiohttp
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config

from ...settings import Settings

log = logging.getLogger(__name__)

TOKEN_REFRESH_SECONDS: Final = 60.0
V5: Final = "v5.channel.k8s.io"
V4: Final = "v4.channel.k8s.io"
MESSAGE_LIMIT: Final = 300


class KubeApiError(Exception):
    """A failed API call: ``status`` is the HTTP status (None when the server was not reached)."""

    def __init__(self, status: int | None, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message[:MESSAGE_LIMIT]


class ConfigurationError(Exception):
    """The proxy cannot find its API server or credentials."""


class TokenFile:
    """A projected service-account token: re-read every minute, and at once after a 401."""

    def __init__(self, path: str, refresh: float = TOKEN_REFRESH_SECONDS) -> None:
        self._path = path
        self._refresh = refresh
        self._token = ""
        self._read_at = float("-inf")

    def current(self) -> str:
        if time.monotonic() - self._read_at >= self._refresh:
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
            self._read_at = time.monotonic()
        return self._token

    def invalidate(self) -> None:
        self._read_at = float("-inf")


def _in_cluster_host() -> str:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigurationError(
            "not in a cluster (KUBERNETES_SERVICE_HOST is unset): pass --kubeconfig, or use --backend local"
        )
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"


class KubeApi:
    def __init__(
        self,
        settings: Settings,
        on_error: Callable[[str], None],
        on_latency: Callable[[str, float], None],
    ) -> None:
        self._settings = settings
        self._on_error = on_error
        self._on_latency = on_latency
        self._configuration: kube_client.Configuration | None = None
        self._api_client: kube_client.ApiClient | None = None
        self._token_file: TokenFile | None = None

    async def open(self) -> None:
        configuration = kube_client.Configuration()
        if self._settings.kubeconfig:
            try:
                await kube_config.load_kube_config(
                    config_file=self._settings.kubeconfig, client_configuration=configuration
                )
            except (OSError, kube_config.ConfigException) as error:
                raise ConfigurationError(f"kubeconfig {self._settings.kubeconfig}: {error}") from None
        else:
            configuration.host = _in_cluster_host()
            configuration.ssl_ca_cert = self._settings.ca_file
            self._token_file = TokenFile(self._settings.token_file)
            self._token_file.current()
        # Every exec holds a connection for its whole life: size the pool for all of them.
        configuration.connection_pool_maxsize = self._settings.max_concurrent * 3 + 10
        self._configuration = configuration
        try:
            self._api_client = kube_client.ApiClient(configuration)
        except (OSError, ValueError) as error:
            raise ConfigurationError(f"cannot set up TLS to the API server: {error}") from None

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()

    @property
    def host(self) -> str:
        assert self._configuration is not None
        return str(self._configuration.host).rstrip("/")

    @property
    def _session(self) -> aiohttp.ClientSession:
        assert self._api_client is not None
        session: aiohttp.ClientSession = self._api_client.rest_client.pool_manager
        return session

    async def _authorization(self) -> dict[str, str]:
        if self._token_file is not None:
            return {"Authorization": f"Bearer {self._token_file.current()}"}
        assert self._configuration is not None
        value = await self._configuration.get_api_key_with_prefix("BearerToken")
        return {"Authorization": value} if value else {}

    def _unauthorized(self) -> bool:
        """After a 401: re-read the token; True if a retry may help."""
        if self._token_file is None:
            return False
        self._token_file.invalidate()
        return True

    async def get_json(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
        text = await self.get_text(path, query)
        try:
            document: dict[str, Any] = json.loads(text)
        except ValueError:
            raise KubeApiError(None, f"API server sent something that is not JSON for {path}") from None
        return document

    @contextlib.contextmanager
    def _timed(self, verb: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self._on_latency(verb, time.monotonic() - started)

    async def get_text(self, path: str, query: dict[str, str] | None = None) -> str:
        # A namespaced collection (/api/v1/namespaces/NS/pods) is a list, anything below it a get.
        with self._timed("list" if path.count("/") == 5 else "get"):
            return await self._get_text(path, query)

    async def _get_text(self, path: str, query: dict[str, str] | None = None) -> str:
        url = self.host + path + ("?" + urlencode(query) if query else "")
        for attempt in (1, 2):
            try:
                async with self._session.get(
                    url,
                    headers=await self._authorization(),
                    timeout=aiohttp.ClientTimeout(total=self._settings.api_timeout),
                    allow_redirects=False,
                ) as response:
                    body = await response.text(errors="replace")
                    if response.status == 401 and attempt == 1 and self._unauthorized():
                        continue
                    if response.status >= 400:
                        raise self._error(response.status, body, path)
                    return body
            except (aiohttp.ClientError, TimeoutError) as error:
                raise self._unreachable(error) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, error: Exception) -> KubeApiError:
        self._on_error("unreachable")
        return KubeApiError(None, f"cannot reach the API server: {error or type(error).__name__}")

    def _count_status(self, status: int) -> None:
        self._on_error(str(status) if status in (401, 403, 404, 409, 429) else f"{status // 100}xx")

    def _error(self, status: int, body: str, what: str) -> KubeApiError:
        self._count_status(status)
        try:
            document = json.loads(body)
            message, reason = str(document.get("message", "")), str(document.get("reason", ""))
        except (ValueError, AttributeError):
            message, reason = body.strip(), ""
        return KubeApiError(status, message or f"HTTP {status} for {what}", reason)

    def exec_url(self, namespace: str, pod: str, container: str, argv: list[str], *, stdin: bool) -> str:
        query = [("command", argument) for argument in argv]
        query += [("container", container), ("stdout", "true"), ("stderr", "true")]
        if stdin:
            query.append(("stdin", "true"))
        path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/exec"
        return self.host + path + "?" + urlencode(query, quote_via=quote)

    async def open_exec(self, url: str, user_agent: str) -> aiohttp.ClientWebSocketResponse:
        """Upgrade to an exec WebSocket, offering v5 then v4 (one header; the server picks)."""
        with self._timed("connect"):
            return await self._open_exec(url, user_agent)

    async def _open_exec(self, url: str, user_agent: str) -> aiohttp.ClientWebSocketResponse:
        for attempt in (1, 2):
            headers = {**await self._authorization(), "User-Agent": user_agent}
            try:
                async with asyncio.timeout(self._settings.api_timeout):  # the handshake only
                    return await self._session.ws_connect(
                        url,
                        protocols=(V5, V4),
                        headers=headers,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
                        max_msg_size=0,
                        autoping=True,
                    )
            except aiohttp.WSServerHandshakeError as error:
                if error.status == 401 and attempt == 1 and self._unauthorized():
                    continue
                self._count_status(error.status)
                raise KubeApiError(error.status, _handshake_message(error.status), "Handshake") from None
            except (aiohttp.ClientError, TimeoutError) as error:
                raise self._unreachable(error) from None
        raise AssertionError("unreachable")  # pragma: no cover


def _handshake_message(status: int) -> str:
    # aiohttp drops the body of a refused upgrade, so say what each status means here.
    return {
        400: "the API server refused the exec request (400): is the container name right?",
        401: "the API server rejected the service-account token (401), also after re-reading it",
        403: "exec into the workspace pod is forbidden (403): the proxy's Role needs get and "
        "create on pods/exec",
        404: "the workspace pod no longer exists (404)",
        500: "the workspace container is not running or not found (500)",
    }.get(status, f"the exec upgrade failed with HTTP {status}")
