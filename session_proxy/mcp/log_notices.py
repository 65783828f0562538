"""Keep a client that sent no progress token informed of a long call, as far as MCP allows.

Progress needs the client's token. Without one, the only thing a server may send about a
running request is a log message (``notifications/message``) on that request's own stream:
on the handshake protocol versions once it declares the logging capability, honouring the
level the client set with ``logging/setLevel``; on 2026-07-28 only when the request opted in
(the SDK checks that). Such a message does not reset a client's request timeout; it shows the
call alive, with its newest output, wherever the client shows server logs.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Final, get_args

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning

from .exec_tool import ProgressReporter

LEVELS: Final[tuple[types.LoggingLevel, ...]] = get_args(types.LoggingLevel)
NOTICE_LEVEL: Final[types.LoggingLevel] = "info"
NOTICE_INTERVAL: Final = 10.0  # seconds before the first notice of a call, and between two
LOGGER: Final = "exec"


class LogNotices:
    """The level each client connection asked for, and the reporters that respect it.

    A connection is known by its ``initialize`` parameters: one object per connection, alive
    as long as it is (the SDK's session object lives for one request only). The level is
    forgotten with that object.
    """

    def __init__(self, interval: float = NOTICE_INTERVAL) -> None:
        self._interval = interval
        self._levels: dict[int, types.LoggingLevel] = {}

    async def set_level(
        self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        connection = ctx.session.client_params
        if connection is not None:
            if id(connection) not in self._levels:
                weakref.finalize(connection, self._levels.pop, id(connection), None)
            self._levels[id(connection)] = params.level
        return types.EmptyResult()

    def reporter(self, ctx: ServerRequestContext[Any, Any]) -> ProgressReporter | None:
        """Sends what progress would have said, once a call has run for an interval and then at
        most once per interval (a short call sends none); None if the client does not want it."""
        connection = ctx.session.client_params
        level = self._levels.get(id(connection), LEVELS[0]) if connection is not None else LEVELS[0]
        if LEVELS.index(level) > LEVELS.index(NOTICE_LEVEL):
            return None
        last_sent: float | None = None

        async def report(elapsed: float, message: str) -> None:
            nonlocal last_sent
            if elapsed < (last_sent or 0.0) + self._interval:
                return
            last_sent = elapsed
            with warnings.catch_warnings():  # deprecated from 2026-07-28; the SDK checks the opt-in
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                sending = ctx.session.send_log_message(
                    NOTICE_LEVEL, message, logger=LOGGER, related_request_id=ctx.request_id
                )  # warns when called, not when awaited: no await may happen inside this block
            await sending

        return report
