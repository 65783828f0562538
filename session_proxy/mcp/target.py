"""What the tools act on: the exec API of a running proxy, reached through ``ExecClient``.

Both transports use it: the stdio bridge points it at ``--url``, the ``/mcp`` endpoint at the
proxy's own exec listener. Going through the exec API (rather than calling the backend) is
what makes a tool call an exec like any other: admission, metrics, the exec id and log line,
and cancellation as a client that hangs up (the command ends as ``client_gone``).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import aiohttp

from ..client import ExecClient, ExecEvents, ProxyProtocolError, ProxyRefused, ProxyUnreachable

USER_AGENT = "session-proxy-mcp"
GET_TIMEOUT = 30.0


class ToolTarget(Protocol):
    """The three things the tools need; tests and transports share this seam."""

    def exec(
        self,
        command: list[str],
        *,
        workdir: str | None,
        env: dict[str, str] | None,
        stdin: str | None,
        timeout: float | None,
    ) -> ExecEvents: ...

    async def status(self) -> dict[str, Any]: ...

    async def logs(self, tail: int) -> str: ...

    async def close(self) -> None: ...


class ExecApiTarget:
    """A proxy's exec API at ``url`` (``http://host:port`` or ``unix:/path``).

    ``status`` and ``logs`` share one HTTP session (and its kept-alive connections), opened on
    first use and closed with the target.
    """

    def __init__(self, url: str, *, token: str | None) -> None:
        self.url = url
        self._token = token
        self._client = ExecClient(url, token=token)
        self._session: aiohttp.ClientSession | None = None

    def exec(
        self,
        command: list[str],
        *,
        workdir: str | None,
        env: dict[str, str] | None,
        stdin: str | None,
        timeout: float | None,
    ) -> ExecEvents:
        return self._client.exec(command, workdir=workdir, env=env, stdin=stdin, timeout=timeout)

    async def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(await self._get("/status", {}))
        return document

    async def logs(self, tail: int) -> str:
        return await self._get("/logs", {"tail": str(tail)})

    async def exec_limits(self) -> tuple[float | None, float | None]:
        """The proxy's default and maximum timeout, from its OpenAPI document."""
        document = json.loads(await self._get("/openapi.json", {}))
        timeout = document["components"]["schemas"]["ExecRequest"]["properties"]["timeout"]
        return timeout.get("default"), timeout["anyOf"][0].get("maximum")

    async def close(self) -> None:
        await self._client.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> tuple[aiohttp.ClientSession, str]:
        """The shared session and the base URL to put paths on."""
        base = self.url
        connector: aiohttp.BaseConnector | None = None
        if base.startswith("unix:"):
            base = "http://localhost"
            if self._session is None:
                connector = aiohttp.UnixConnector(path=self.url.removeprefix("unix:"))
        if self._session is None:
            headers = {"User-Agent": USER_AGENT}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            timeout = aiohttp.ClientTimeout(total=GET_TIMEOUT)
            self._session = aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)
        return self._session, base.rstrip("/")

    async def _get(self, path: str, query: dict[str, str]) -> str:
        session, base = self._http()
        try:
            async with session.get(base + path, params=query) as response:
                text = await response.text()
                if response.status != 200:
                    raise _refusal(response.status, text)
                return text
        except aiohttp.ClientConnectorError as error:
            raise ProxyUnreachable(f"cannot reach session-proxy at {self.url}: {error}") from error
        except TimeoutError as error:
            message = f"session-proxy at {self.url} did not answer within {GET_TIMEOUT:g} s"
            raise ProxyUnreachable(message) from error
        except aiohttp.ClientError as error:
            raise ProxyProtocolError(f"session-proxy at {self.url} broke off its answer: {error}") from error


def _refusal(status: int, text: str) -> ProxyRefused:
    try:
        detail = json.loads(text)["error"]
        return ProxyRefused(status, str(detail["code"]), str(detail["message"]), detail.get("retry_after"))
    except (ValueError, KeyError, TypeError):
        return ProxyRefused(status, "unexpected_response", text[:200], None)
