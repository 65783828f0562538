"""An async client for the exec API, for agents' tool layers and the CLI.

    async with ExecClient() as client, client.exec(["npm", "test"], workdir="/repo") as events:
        async for event in events:
            ...  # StartEvent, WaitingEvent, OutputEvent, then one ExitEvent

Leaving the ``async with`` block early (``break``, an exception) closes the response, which
ends the command at once; ``async for event in client.exec(...)`` without it works too, but an
abandoned stream is then closed only when the iterator is collected.

Errors, all ``ProxyClientError``: ``ProxyUnreachable`` (cannot connect, or connecting timed
out), ``ProxyRefused`` (a 4xx/5xx error body), ``ProxyProtocolError`` (the connection or stream
broke off, an event this client cannot read, or no ``exit`` event at the end).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from .jobs.models import JOB_EVENT_ADAPTER, JobDocument, JobEvent, JobList
from .models import EVENT_ADAPTER, ExitEvent, OutputEvent, StartEvent, WaitingEvent

DEFAULT_URL = "http://127.0.0.1:8081"
URL_VARIABLE = "SESSION_PROXY_URL"
TOKEN_FILE_VARIABLE = "SESSION_PROXY_AUTH_TOKEN_FILE"  # noqa: S105 (a variable name)
ExecEvent = StartEvent | WaitingEvent | OutputEvent | ExitEvent


class ProxyClientError(Exception):
    pass


class ProxyUnreachable(ProxyClientError):
    pass


class ProxyProtocolError(ProxyClientError):
    pass


class ProxyRefused(ProxyClientError):
    def __init__(self, status: int, code: str, message: str, retry_after: float | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def default_url() -> str:
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL


def default_token() -> str | None:
    """The proxy's shared secret, when SESSION_PROXY_AUTH_TOKEN_FILE names its file."""
    path = os.environ.get(TOKEN_FILE_VARIABLE)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip() or None
    except OSError as error:
        raise ProxyClientError(f"cannot read the proxy token from {path}: {error.strerror}") from None


class ExecClient:
    def __init__(
        self, url: str | None = None, *, token: str | None = None, connect_timeout: float = 10
    ) -> None:
        url = url or default_url()
        token = token or default_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        connector: aiohttp.BaseConnector | None = None
        if url.startswith("unix:"):
            connector = aiohttp.UnixConnector(path=url.removeprefix("unix:"))
            url = "http://localhost"
        self._base = url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        )

    async def __aenter__(self) -> ExecClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    def exec(
        self,
        command: list[str],
        *,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> ExecEvents:
        """Run ``command``; its events arrive as they happen, the last one an ``ExitEvent``."""
        body = _exec_body(command, workdir=workdir, env=env, stdin=stdin, timeout=timeout)
        return ExecEvents(self._stream(body))

    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[ExecEvent, None]:
        try:
            async with self._session.post(f"{self._base}/exec", json=body) as response:
                if response.status != 200:
                    raise await _refusal(response)
                ended = False
                try:
                    async for event in _events(response):
                        ended = isinstance(event, ExitEvent)
                        yield event
                finally:
                    if not ended:
                        response.close()  # the proxy sees the hang-up and ends the command now
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            raise ProxyUnreachable(f"cannot reach session-proxy at {self._base}: {error}") from error
        except aiohttp.ServerDisconnectedError as error:
            raise ProxyProtocolError(f"session-proxy closed the connection early: {error}") from error
        except aiohttp.ClientPayloadError as error:
            raise ProxyProtocolError(f"the event stream broke off: {error}") from error
        except ValidationError as error:
            problem = error.errors(include_url=False)[0]["msg"]
            raise ProxyProtocolError(
                f"session-proxy sent an event this client cannot read: {problem}"
            ) from None
        except aiohttp.ClientError as error:
            raise ProxyProtocolError(f"talking to session-proxy failed: {error!r}") from error

    # ---- background jobs (POST /jobs and below) ------------------------------------------

    async def start_job(
        self,
        command: list[str],
        *,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> JobDocument:
        """Start ``command`` as a background job; returns once it runs (or waits for the workspace)."""
        body = _exec_body(command, workdir=workdir, env=env, stdin=stdin, timeout=timeout)
        return JobDocument.model_validate(await self._json("POST", "/jobs", body=body))

    async def jobs(self) -> list[JobDocument]:
        """Running jobs and ended ones still kept, oldest first."""
        return JobList.model_validate(await self._json("GET", "/jobs")).jobs

    async def job(self, job_id: str) -> JobDocument:
        return JobDocument.model_validate(await self._json("GET", f"/jobs/{quote(job_id, safe='')}"))

    async def end_job(self, job_id: str) -> JobDocument:
        """End the job (TERM, grace, KILL; the whole group); returns it once it is gone."""
        return JobDocument.model_validate(await self._json("DELETE", f"/jobs/{quote(job_id, safe='')}"))

    async def job_output(
        self,
        job_id: str,
        *,
        stdout: int = 0,
        stderr: int = 0,
        wait: float = 0,
        follow: bool = False,
        limit: int | None = None,
    ) -> AsyncIterator[JobEvent]:
        """The job's output from the given offsets; the last event is a ``CursorEvent``."""
        query = {
            "stdout": str(stdout),
            "stderr": str(stderr),
            "wait": str(wait),
            "follow": str(follow).lower(),
        }
        if limit is not None:
            query["limit"] = str(limit)
        path = f"{self._base}/jobs/{quote(job_id, safe='')}/output"
        try:
            async with self._session.get(path, params=query) as response:
                if response.status != 200:
                    raise await _refusal(response)
                async for line in _lines(response):
                    yield JOB_EVENT_ADAPTER.validate_json(line)
        except aiohttp.ClientError as error:
            raise _client_error(self._base, error) from error

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with self._session.request(method, f"{self._base}{path}", json=body) as response:
                if response.status >= 300:
                    raise await _refusal(response)
                return await response.json()
        except aiohttp.ClientError as error:
            raise _client_error(self._base, error) from error


def _exec_body(
    command: list[str],
    *,
    workdir: str | None,
    env: dict[str, str] | None,
    stdin: bytes | str | None,
    timeout: float | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"command": command}
    if workdir is not None:
        body["workdir"] = workdir
    if env:
        body["env"] = env
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_b64"] = base64.b64encode(stdin).decode("ascii")
    if timeout is not None:
        body["timeout"] = timeout
    return body


def _client_error(base: str, error: aiohttp.ClientError) -> ProxyClientError:
    if isinstance(error, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return ProxyUnreachable(f"cannot reach session-proxy at {base}: {error}")
    return ProxyProtocolError(f"talking to session-proxy failed: {error!r}")


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    pending = bytearray()
    async for data in response.content.iter_any():
        pending += data
        if b"\n" in data:
            *lines, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in lines:
                yield bytes(line)


class ExecEvents:
    """The events of one exec: ``async for`` over it; ``async with`` it to end it on leaving."""

    def __init__(self, events: AsyncGenerator[ExecEvent, None]) -> None:
        self._events = events

    def __aiter__(self) -> ExecEvents:
        return self

    async def __anext__(self) -> ExecEvent:
        return await anext(self._events)

    async def __aenter__(self) -> ExecEvents:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading: if the exec has not ended, the proxy ends the command now."""
        await self._events.aclose()


async def _refusal(response: aiohttp.ClientResponse) -> ProxyRefused:
    try:
        detail = (await response.json())["error"]
        return ProxyRefused(response.status, detail["code"], detail["message"], detail.get("retry_after"))
    except (aiohttp.ContentTypeError, json.JSONDecodeError, KeyError, TypeError):
        text = (await response.text())[:200]
        return ProxyRefused(response.status, "unexpected_response", text, None)


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[ExecEvent]:
    # Split lines ourselves: an event line may exceed aiohttp's readline limit. The pending
    # bytes are only split when a line end has arrived, so a long line is scanned once.
    pending = bytearray()
    ended = False
    async for data in response.content.iter_any():
        pending += data
        if b"\n" not in data:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            event: ExecEvent = EVENT_ADAPTER.validate_json(line)
            ended = isinstance(event, ExitEvent)
            yield event
    if not ended:
        raise ProxyProtocolError("the event stream ended without an exit event")
