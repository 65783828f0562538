"""MCP clients for the tests: the SDK's own, over Streamable HTTP and over stdio."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

TRANSPORTS = ("http", "stdio")


class ProgressLog:
    """Collects progress messages; a test can wait for one that contains some text."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._arrived = asyncio.Condition()

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        async with self._arrived:
            self.messages.append(message or "")
            self._arrived.notify_all()

    async def wait_for(self, text: str, within: float = 20) -> str:
        async with asyncio.timeout(within), self._arrived:
            while True:
                for message in self.messages:
                    if text in message:
                        return message
                await self._arrived.wait()


@contextlib.asynccontextmanager
async def http_session(
    url: str, *, token: str | None = None, logging_callback: Any = None
) -> AsyncIterator[ClientSession]:
    """An initialized session with ``url``'s ``/mcp`` (Streamable HTTP)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as client,
        streamable_http_client(f"{url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write, logging_callback=logging_callback) as session,
    ):
        await session.initialize()
        yield session


@contextlib.asynccontextmanager
async def stdio_session(
    url: str,
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
    logging_callback: Any = None,
) -> AsyncIterator[ClientSession]:
    """An initialized session with ``session-proxy mcp --url URL``, spawned as clients do."""
    parameters = StdioServerParameters(
        command=sys.executable,
        args=["-m", "session_proxy", "mcp", "--url", url, *flags],
        env=env,
    )
    with (log_dir / f"mcp-stdio-{time.monotonic_ns()}.log").open("w") as errlog:
        async with (
            stdio_client(parameters, errlog=errlog) as (read, write),
            ClientSession(read, write, logging_callback=logging_callback) as session,
        ):
            await session.initialize()
            yield session


@contextlib.asynccontextmanager
async def connect(
    transport: str, url: str, log_dir: Path, *, token: str | None = None, **stdio: Any
) -> AsyncIterator[ClientSession]:
    if transport == "http":
        async with http_session(url, token=token, logging_callback=stdio.get("logging_callback")) as session:
            yield session
    else:
        async with stdio_session(url, log_dir, **stdio) as session:
            yield session


def text_of(result: Any) -> str:
    return "".join(block.text for block in result.content)
