"""The only module that talks to the Kubernetes API.

Where the server is and what to show it comes from ``credentials.InClusterAccess`` in a pod
(standard library and aiohttp only) or ``kubeconfig.KubeconfigAccess`` (kubernetes-asyncio,
imported only then). Requests are made here so that the token is under our control (see
``credentials.TokenFile``: kubernetes_asyncio itself never re-reads on 401). Failures become the
typed errors of ``api_errors``, with the server's text capped and never the token. The exec
WebSocket's channel protocol lives in ``ExecStream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, Final
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from ...settings import Settings
from .api_errors import KubeError, Unavailable, error_from_body, handshake_error
from .credentials import ApiAccess, InClusterAccess
from .exec_stream import V4, V5, ExecStream

log = logging.getLogger(__name__)

# A pod list or a log tail larger than this is refused rather than held in memory.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
# Runtimes write exec frames of 32 KiB at most; anything far larger is refused, not buffered.
MAX_FRAME_BYTES: Final = 1024 * 1024
WATCH_LINE_BYTES: Final = 2 * 1024 * 1024


class KubeApi:
    def __init__(
        self,
        settings: Settings,
        on_error: Callable[[str], None],
        on_latency: Callable[[str, float], None],
        *,
        on_token_changed: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_error = on_error
        self._on_latency = on_latency
        self._on_token_changed = on_token_changed
        self._access: ApiAccess | None = None

    async def open(self) -> None:
        settings = self._settings
        # Every exec holds a connection for its whole life: size the pool for all of them.
        pool_size = settings.max_concurrent * 3 + settings.warm_execs + 10
        if settings.kubeconfig:
            from .kubeconfig import KubeconfigAccess  # loads kubernetes-asyncio: only for a kubeconfig

            self._access = await KubeconfigAccess.open(settings.kubeconfig, pool_size)
        else:
            self._access = InClusterAccess.open(
                settings.token_file, settings.ca_file, pool_size, on_token_changed=self._on_token_changed
            )

    async def close(self) -> None:
        if self._access is not None:
            await self._access.close()

    @property
    def _opened(self) -> ApiAccess:
        assert self._access is not None, "KubeApi.open() first"
        return self._access

    @property
    def host(self) -> str:
        return self._opened.host

    @property
    def _session(self) -> aiohttp.ClientSession:
        return self._opened.session

    async def _authorization(self) -> dict[str, str]:
        return await self._opened.authorization()

    def _reread_token_after_401(self) -> bool:
        """Make the retry read the token anew; False if there is nothing to re-read."""
        return self._opened.reread_token()

    async def get_json(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
        text, _ = await self.get_text(path, query)
        try:
            document: dict[str, Any] = json.loads(text)
        except ValueError:
            raise Unavailable(f"API server sent something that is not JSON for {path}") from None
        return document

    @contextlib.contextmanager
    def _timed(self, verb: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self._on_latency(verb, time.monotonic() - started)

    async def get_text(
        self, path: str, query: dict[str, str] | None = None, *, cap: int = MAX_BODY_BYTES
    ) -> tuple[str, bool]:
        """The body (at most ``cap`` bytes of it), and whether it was cut there."""
        # A namespaced collection (/api/v1/namespaces/NS/pods) is a list, anything below it a get.
        with self._timed("list" if path.count("/") == 5 else "get"):
            return await self._get_text(path, query, cap)

    async def _get_text(self, path: str, query: dict[str, str] | None, cap: int) -> tuple[str, bool]:
        url = self.host + path + ("?" + urlencode(query) if query else "")
        for attempt in (1, 2):
            try:
                async with self._session.get(
                    url,
                    headers=await self._authorization(),
                    timeout=aiohttp.ClientTimeout(total=self._settings.api_timeout),
                    allow_redirects=False,
                ) as response:
                    body, cut = await _read_capped(response.content, cap)
                    text = body.decode("utf-8", errors="replace")
                    if response.status == 401 and attempt == 1 and self._reread_token_after_401():
                        continue
                    if response.status >= 400:
                        raise self._refused(response.status, text, path)
                    return text, cut
            except (aiohttp.ClientError, TimeoutError) as error:
                raise self._unreachable(error) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def watch(
        self, path: str, query: dict[str, str], seconds: float
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The events of a ``watch=true`` list, one JSON object per line; the server ends the
        stream after ``seconds`` (rounded up to whole seconds, as ``timeoutSeconds`` takes them)."""
        query = {**query, "watch": "true", "timeoutSeconds": str(max(1, math.ceil(seconds)))}
        url = self.host + path + "?" + urlencode(query)
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._settings.api_timeout,
            sock_read=seconds + self._settings.api_timeout,
        )
        try:
            async with self._session.get(
                url, headers=await self._authorization(), timeout=timeout, allow_redirects=False
            ) as response:
                if response.status >= 400:
                    body, _ = await _read_capped(response.content, MAX_BODY_BYTES)
                    raise self._refused(response.status, body.decode(errors="replace"), path)
                while line := await response.content.readline(max_line_length=WATCH_LINE_BYTES):
                    if line.strip():
                        try:
                            event = json.loads(line)
                        except ValueError:
                            raise Unavailable(
                                f"API server sent a watch line that is not JSON for {path}"
                            ) from None
                        yield event
        except (aiohttp.ClientError, TimeoutError, HttpProcessingError) as error:
            raise self._unreachable(error) from None

    def _unreachable(self, error: Exception) -> KubeError:
        self._on_error("unreachable")
        return Unavailable(f"cannot reach the API server: {error or type(error).__name__}")

    def _count_status(self, status: int) -> None:
        self._on_error(str(status) if status in (401, 403, 404, 409, 429) else f"{status // 100}xx")

    def _refused(self, status: int, body: str, what: str) -> KubeError:
        self._count_status(status)
        return error_from_body(status, body, what)

    def exec_url(self, namespace: str, pod: str, container: str, argv: list[str], *, stdin: bool) -> str:
        return self.host + exec_target(namespace, pod, container, argv, stdin=stdin)

    async def open_exec(self, url: str, user_agent: str) -> ExecStream:
        """Upgrade to an exec WebSocket, offering v5 then v4 (one header; the server picks)."""
        with self._timed("connect"):
            return await self._open_exec(url, user_agent)

    async def _open_exec(self, url: str, user_agent: str) -> ExecStream:
        for attempt in (1, 2):
            headers = {**await self._authorization(), "User-Agent": user_agent}
            try:
                async with asyncio.timeout(self._settings.api_timeout):  # the handshake only
                    websocket = await self._session.ws_connect(
                        url,
                        protocols=(V5, V4),
                        headers=headers,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
                        max_msg_size=MAX_FRAME_BYTES,
                        autoping=False,  # ExecStream answers pings and times the pongs itself
                    )
            except aiohttp.WSServerHandshakeError as error:
                if error.status == 401 and attempt == 1 and self._reread_token_after_401():
                    continue
                self._count_status(error.status)
                raise handshake_error(error.status) from None
            except (aiohttp.ClientError, TimeoutError) as error:
                raise self._unreachable(error) from None
            return ExecStream(
                websocket,
                ping_interval=self._settings.exec_ping_interval,
                ping_timeout=self._settings.exec_ping_timeout,
            )
        raise AssertionError("unreachable")  # pragma: no cover


async def _read_capped(content: aiohttp.StreamReader, cap: int) -> tuple[bytes, bool]:
    body = bytearray()
    async for chunk in content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > cap:  # the rest is dropped with the connection
            return bytes(body[:cap]), True
    return bytes(body), False


def exec_target(namespace: str, pod: str, container: str, argv: list[str], *, stdin: bool) -> str:
    """The path and query of a pod's exec request."""
    query = [("command", argument) for argument in argv]
    query += [("container", container), ("stdout", "true"), ("stderr", "true")]
    if stdin:
        query.append(("stdin", "true"))
    path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/exec"
    # Spaces as `+`, as kubectl sends them: the wrapper script stays well inside the 8 KiB
    # request line that common proxies (and aiohttp) accept.
    return path + "?" + urlencode(query)
