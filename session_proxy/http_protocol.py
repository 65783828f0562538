"""aiohttp's connection handler, adjusted: parse errors in JSON; stuck connections let go.

aiohttp answers a request it cannot parse (bad request line, bad header, Content-Length with
Transfer-Encoding, ...) itself, before any middleware runs: ``text/plain`` echoing the bad
bytes, and it logs each at error level with a full traceback (about ten times the size of the
request). Here the answer is the API's JSON error body and the log is one short line at info
level (rate-limited by ``log_throttle``); only a 500, a bug, keeps its traceback.

When a connection's handling ends (closed, kept-alive and then timed out, or its handler
cancelled), bytes still unsent get ``UNSENT_DATA_BOUND`` seconds to leave before the connection
is aborted: a client that stopped reading must not keep its socket and buffer for ever.
"""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus
from typing import Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .guards import SECURITY_HEADERS
from .transport import abort_if_unsent

log = logging.getLogger(__name__)

# The parser quotes what it refused (b'...'); that is the client's own input: never echo it.
ECHOED_BYTES: Final = re.compile(r"""\bb['"]""")
UNSENT_DATA_BOUND: Final = 10.0
ERROR_CODES: Final = {400: "malformed_http", 413: "body_too_large", 431: "headers_too_large"}


def describe(status: int, message: str | None) -> str:
    """One line for the client: the parser's reason without the echoed bytes."""
    first_line = (message or "").strip().partition("\n")[0]
    reason = ECHOED_BYTES.split(first_line)[0].rstrip(": ")[:200]
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    if status >= 500:
        return f"{phrase}: the proxy failed to handle this request (logged); retry or report it"
    return f"{phrase}: the request is not valid HTTP/1.1 for this server: {reason or phrase}"


class ProxyRequestHandler(RequestHandler):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._task_handler is not None:
            self._task_handler.add_done_callback(lambda _: abort_if_unsent(transport, UNSENT_DATA_BOUND))

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer with the JSON error body and close the connection (as aiohttp does)."""
        if status >= 500:
            log.error("request failed", extra={"status": status, "remote": request.remote}, exc_info=exc)
        else:
            log.info(
                "request refused by the HTTP parser",
                extra={"status": status, "reason": describe(status, message), "remote": request.remote},
            )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        code = ERROR_CODES.get(status, "internal_error" if status >= 500 else "http_error")
        response = web.json_response(
            {"error": {"code": code, "message": describe(status, message)}},
            status=status,
            headers=SECURITY_HEADERS,
        )
        response.force_close()
        return response


class _ProxyHttpServer(web.Server):
    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=asyncio.get_running_loop(), **self._kwargs)


class ProxyAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are ``ProxyRequestHandler``s."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # starts the application, as AppRunner does
        return _ProxyHttpServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )
