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

from ..client import ExecClient, ExecEvents, ProxyRefused, ProxyUnreachable

USER_AGENT = "session-proxy-mcp"


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

    @property
    def client(self) -> ExecClient:
        """The exec API's client, for the job tools (POST /jobs and below)."""


class ExecApiTarget:
    """A proxy's exec API at ``url`` (``http://host:port`` or ``unix:/path``)."""

    def __init__(self, url: str, *, token: str | None) -> None:
        self.url = url
        self._token = token
        self._client = ExecClient(url, token=token)

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

    async def close(self) -> None:
        await self._client.close()

    @property
    def client(self) -> ExecClient:
        return self._client

    async def _get(self, path: str, query: dict[str, str]) -> str:
        connector: aiohttp.BaseConnector | None = None
        base = self.url
        if base.startswith("unix:"):
            connector = aiohttp.UnixConnector(path=base.removeprefix("unix:"))
            base = "http://localhost"
        headers = {"User-Agent": USER_AGENT}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session,
                session.get(base.rstrip("/") + path, params=query) as response,
            ):
                text = await response.text()
                if response.status != 200:
                    raise _refusal(response.status, text)
                return text
        except aiohttp.ClientConnectorError as error:
            raise ProxyUnreachable(f"cannot reach session-proxy at {self.url}: {error}") from error


def _refusal(status: int, text: str) -> ProxyRefused:
    try:
        detail = json.loads(text)["error"]
        return ProxyRefused(status, str(detail["code"]), str(detail["message"]), detail.get("retry_after"))
    except (ValueError, KeyError, TypeError):
        return ProxyRefused(status, "unexpected_response", text[:200], None)
