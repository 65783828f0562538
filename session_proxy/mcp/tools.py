"""The MCP tools ``exec``, ``status`` and ``logs``, defined once on the SDK's low-level server.

Both transports serve the ``Server`` built here; they differ only in the target they hand it
(which exec API) and in how a call learns that its HTTP exchange is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, Final, get_args

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from pydantic import ValidationError

from .. import __version__
from ..client import ProxyClientError, ProxyRefused
from ..models import ExitReason, StatusResponse
from .arguments import ExecArguments, LogsArguments, ToolOptions
from .exec_tool import ProgressReporter, ToolOutcome, refusal_message, run_exec
from .log_notices import LogNotices
from .target import ToolTarget

# How a transport tells a call that nobody will read its result (the HTTP request is gone).
ExchangeClosed = Callable[[ServerRequestContext[Any, Any]], asyncio.Event | None]

INSTRUCTIONS: Final = (
    "Commands run in the session's workspace (a separate container with the user's tools), "
    "not where you are. Use `exec` for every shell command."
)
# `status` and `logs` only look: the same call gives the same answer and changes nothing.
READ_ONLY: Final = types.ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
EXEC_INPUT_DESCRIPTION: Final = (
    "Give exactly one of `command` (a shell command line) or `argv` (a program and its "
    "arguments, run without a shell); everything else is optional."
)
EXEC_OUTPUT_SCHEMA: Final = {
    "title": "exec result",
    "type": "object",
    "properties": {
        "exit_code": {"type": ["integer", "null"], "description": "null when the command did not exit"},
        "signal": {"type": ["integer", "null"], "description": "signal that killed it, where known"},
        "reason": {"type": "string", "enum": list(get_args(ExitReason))},
        "duration_ms": {"type": "integer"},
        "stdout_bytes": {"type": "integer", "description": "exact, before any cut"},
        "stderr_bytes": {"type": "integer", "description": "exact, before any cut"},
        "truncated": {"type": "boolean", "description": "output cut in the middle or capped"},
    },
    "required": ["exit_code", "signal", "reason", "duration_ms", "stdout_bytes", "stderr_bytes", "truncated"],
}


def _limit(value: float | None, what: str) -> str:
    return f"{what} {value:g} s" if value is not None else f"{what} set by the proxy"


def exec_description(options: ToolOptions) -> str:
    workdir = options.workdir or "the workspace's default directory"
    return (
        "Run a command in the session's workspace container (the user's image and files, not "
        "your own machine) and return its output and exit code. `command` runs as `sh -c "
        f"<command>`; `argv` runs a program without a shell. It starts in `workdir` (default "
        f"{workdir}). Timeout: {_limit(options.default_timeout, 'default')}, "
        f"{_limit(options.max_timeout, 'at most')}; when it runs out the command and every "
        "process it started are ended. Background processes end with the command unless "
        "detached: `setsid server >/tmp/server.log 2>&1 </dev/null &` (no timeout or kill reaches "
        "it then: stop it yourself when done). stdout and stderr come back interleaved a line at a "
        "time, each stderr line starting with `[stderr] `; beyond "
        f"{options.max_output_chars} characters the middle is cut between lines (the byte counts "
        "stay exact), so send long output to a file and read parts of it. A non-zero exit code is "
        "a normal result, not an error; the last line of the text says the exit code."
    )


def tool_list(options: ToolOptions) -> list[types.Tool]:
    exec_schema = ExecArguments.model_json_schema()
    # Said in words: clients and model APIs refuse oneOf/anyOf at the top of an input schema.
    exec_schema.update(title="exec arguments", description=EXEC_INPUT_DESCRIPTION)
    if options.max_timeout is not None:
        exec_schema["properties"]["timeout"]["anyOf"][0]["maximum"] = options.max_timeout
    return [
        types.Tool(
            name="exec",
            title="Run a command in the workspace",
            description=exec_description(options),
            input_schema=exec_schema,
            output_schema=EXEC_OUTPUT_SCHEMA,
            annotations=types.ToolAnnotations(
                read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
            ),
        ),
        types.Tool(
            name="status",
            title="Workspace status",
            description="Whether the workspace is ready to run commands: the backend and, on "
            "Kubernetes, the workspace pod (name, phase, readiness, image, restarts, and what stops "
            "it being used), plus how many commands run now and the limit. Call it when `exec` "
            "says the workspace is not ready.",
            input_schema={"type": "object", "properties": {}, "additionalProperties": False},
            output_schema=StatusResponse.model_json_schema(),
            annotations=READ_ONLY,
        ),
        types.Tool(
            name="logs",
            title="Workspace container log",
            description="The last `tail` lines of the workspace container's own log (what its main "
            "process printed, not the output of `exec` commands); useful when the workspace "
            "restarts or fails to start. Only the Kubernetes backend has one: on the local backend "
            "it says so.",
            input_schema=LogsArguments.model_json_schema(),
            annotations=READ_ONLY,
        ),
    ]


def _result(outcome: ToolOutcome) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=outcome.text)],
        structured_content=outcome.structured,
        is_error=outcome.is_error,
    )


def _invalid(error: ValidationError) -> ToolOutcome:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in problem['loc']) or 'arguments'}: "
        f"{str(problem['msg']).removeprefix('Value error, ')}"
        for problem in error.errors(include_url=False)
    )
    return ToolOutcome(f"invalid arguments: {problems}", is_error=True)


def _status_summary(document: dict[str, Any]) -> str:
    ready = "ready to run commands" if document.get("ready") else "NOT ready to run commands"
    target = document.get("target") or {}
    pod = ", ".join(f"{key}: {value}" for key, value in target.items() if value not in (None, "", [], {}))
    return (
        f"The workspace ({document.get('backend')} backend) is {ready}. "
        f"{document.get('in_flight')} of at most {document.get('max_concurrent')} commands are "
        f"running{'; the proxy is shutting down' if document.get('draining') else ''}."
        + (f" Target: {pod}." if pod else "")
    )


class ToolCalls:
    """The handlers: validate arguments, call the target, turn what happened into a result."""

    def __init__(
        self,
        target: ToolTarget,
        options: ToolOptions,
        exchange_closed: ExchangeClosed | None,
    ) -> None:
        self._target = target
        self._options = options
        self._exchange_closed = exchange_closed
        self.notices = LogNotices()

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list(self._options))

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        arguments = params.arguments or {}
        return _result(await self._call(ctx, params.name, arguments))

    async def _call(
        self, ctx: ServerRequestContext[Any, Any], name: str, arguments: dict[str, Any]
    ) -> ToolOutcome:
        try:
            if name == "exec":
                outcome = await self._exec(ctx, ExecArguments.model_validate(arguments))
            elif name == "status":
                outcome = (
                    await self._status()
                    if not arguments
                    else ToolOutcome("status takes no arguments", is_error=True)
                )
            elif name == "logs":
                outcome = await self._logs(LogsArguments.model_validate(arguments))
            else:
                outcome = ToolOutcome(f"unknown tool {name!r}; there are exec, status, logs", is_error=True)
        except ValidationError as error:
            outcome = _invalid(error)
        return outcome

    async def _exec(self, ctx: ServerRequestContext[Any, Any], arguments: ExecArguments) -> ToolOutcome:
        report: ProgressReporter | None = None
        if progress_token_from_params(ctx.params) is not None:

            async def report(progress: float, message: str) -> None:
                await ctx.session.report_progress(progress, None, message)

        else:
            report = self.notices.reporter(ctx)  # no progress token: log messages, where allowed

        call = run_exec(self._target, arguments, self._options, report)
        closed = self._exchange_closed(ctx) if self._exchange_closed else None
        if closed is None:
            return await call
        return await _unless_closed(call, closed)

    async def _status(self) -> ToolOutcome:
        try:
            document = await self._target.status()
        except ProxyRefused as error:
            return ToolOutcome(refusal_message(error), is_error=True)
        except ProxyClientError as error:
            return ToolOutcome(f"cannot get the status: {error}", is_error=True)
        return ToolOutcome(_status_summary(document), structured=document)

    async def _logs(self, arguments: LogsArguments) -> ToolOutcome:
        try:
            text = await self._target.logs(arguments.tail)
        except ProxyRefused as error:
            if error.status == 404:
                return ToolOutcome(
                    "There is no workspace container log here: commands run as local processes "
                    "(the local backend), and only the Kubernetes backend has a container log. "
                    f"Read log files with `exec` instead. (The proxy said: {error.message}.)",
                    is_error=True,
                )
            return ToolOutcome(refusal_message(error), is_error=True)
        except ProxyClientError as error:
            return ToolOutcome(f"cannot get the log: {error}", is_error=True)
        return ToolOutcome(text or "(the log is empty)")


async def _unless_closed(call: Coroutine[Any, Any, ToolOutcome], closed: asyncio.Event) -> ToolOutcome:
    """Run ``call``; if the exchange carrying its result closes first, cancel it (ending the command)."""
    task: asyncio.Task[ToolOutcome] = asyncio.ensure_future(call)
    watcher = asyncio.ensure_future(closed.wait())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return ToolOutcome("cancelled: the client went away; the command was ended", is_error=True)
    return task.result()


def build_server(
    target: ToolTarget,
    options: ToolOptions,
    *,
    exchange_closed: ExchangeClosed | None = None,
) -> Server[Any]:
    calls = ToolCalls(target, options, exchange_closed)
    with warnings.catch_warnings():
        # Deprecated from 2026-07-28, and still how the handshake versions let a server log.
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        return Server(
            "session-proxy",
            version=__version__,
            title="session-proxy workspace",
            instructions=INSTRUCTIONS,
            on_list_tools=calls.list_tools,
            on_call_tool=calls.call_tool,
            on_set_logging_level=calls.notices.set_level,
        )
