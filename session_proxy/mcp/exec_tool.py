"""One ``exec`` tool call: run the command through the target, report progress, shape the result.

Free of the MCP SDK: it returns a ``ToolOutcome`` that ``tools.py`` turns into a
``CallToolResult``. A non-zero exit is a normal result; ``is_error`` is set only when the
command could not run or was ended early, with a message saying what happened and what to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..client import ExecEvents, ProxyClientError, ProxyProtocolError, ProxyRefused, ProxyUnreachable
from ..models import ExitEvent, OutputEvent, StartEvent, WaitingEvent
from .arguments import ExecArguments, ToolOptions
from .output import OutputDigest
from .target import ToolTarget

log = logging.getLogger(__name__)
ProgressReporter = Callable[[float, str], Awaitable[None]]
NOT_STARTED_RETRY: Final = 5  # seconds: a workspace that did not come up in time may need a moment
QUIET_HEARTBEAT: Final = 2  # progress intervals without output before a "still running" message

EARLY_END_ADVICE: Final = {
    "timeout": "it ran out of time ({timeout}) and was ended with everything it started. Give a "
    "larger `timeout` (at most {max_timeout}), or split the work into steps that each end in time.",
    "idle_timeout": "it printed nothing for too long (the proxy's --idle-timeout) and was ended. "
    "Make it print progress (a verbose flag, say), or give it the input it may be waiting for "
    "(`stdin`).",
    "output_limit": "it printed more than the proxy's output cap (--max-output-bytes) and was ended. "
    "Redirect the output to a file (`cmd >/tmp/out.log 2>&1`) and read parts of it.",
    "shutdown": "the proxy is shutting down and ended it. Retry in a few seconds.",
    "transport_lost": "the connection to the workspace was lost, so its outcome is unknown. "
    "Check with `status`, then retry; make commands safe to re-run.",
    "pod_gone": "the workspace pod went away while it ran. Check with `status`; retry when it is ready.",
    "error": "the proxy could not run it.",
}


@dataclass
class ToolOutcome:
    text: str
    structured: dict[str, Any] | None = None
    is_error: bool = False


@dataclass
class _Progress:
    digest: OutputDigest
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: str | None = None


def _seconds(value: float | None, unknown: str) -> str:
    return unknown if value is None else f"{value:g} s"


def refusal_message(error: ProxyRefused) -> str:
    """The proxy said no before the command started: say why and when to retry."""
    retry = f"; retry in {error.retry_after:g} s" if error.retry_after else ""
    if error.status == 429:
        return f"not run: the proxy is at its limit ({error.code}: {error.message}){retry}."
    if error.status == 503:  # the message says which: the workspace is not ready, or shutting down
        return f"not run: {error.message}{retry}."
    if error.status == 422:
        return f"not run: the request was invalid: {error.message}. Fix the arguments and call again."
    return f"not run: the proxy refused ({error.status} {error.code}): {error.message}{retry}."


def _exit_line(event: ExitEvent) -> str:
    if event.exit_code is not None:
        return f"exit code: {event.exit_code}"
    if event.signal is not None:
        return f"exit code: none (killed by signal {event.signal})"
    return f"exit code: none (ended: {event.reason})"


def _could_not_start(event: ExitEvent) -> bool:
    """The program is missing (127) or not executable (126): ``argv`` has no shell to say so."""
    return event.reason == "error" and event.exit_code in (126, 127)


def _early_end_message(event: ExitEvent, start: StartEvent, options: ToolOptions) -> str:
    advice = EARLY_END_ADVICE.get(event.reason, "it was ended early.").format(
        timeout=_seconds(start.timeout, "its timeout"),
        max_timeout=_seconds(options.max_timeout, "the proxy's --max-timeout"),
    )
    detail = f" ({event.message})" if event.message else ""
    return f"error: the command did not finish on its own: {advice}{detail}"


def exit_outcome(
    event: ExitEvent, digest: OutputDigest, start: StartEvent | None, options: ToolOptions
) -> ToolOutcome:
    """The result for a command that ran: output, maybe an explanation, then the exit code line."""
    early = event.reason != "exited"
    if early and start is not None and _could_not_start(event):
        # As a shell would say it: the message on stderr and its status, not an early end.
        digest.feed("stderr", f"{event.message or 'cannot run the program'}\n".encode(), final=True)
        early = False
    digest.finish()
    text = digest.text()
    if text and not text.endswith("\n"):
        text += "\n"
    if early and start is None:
        # Ended while waiting for the workspace: nothing ran.
        text += (
            f"not run: {event.message or event.reason}. Check `status` for why; "
            f"retry in {NOT_STARTED_RETRY} s.\n"
        )
    elif early and start is not None:
        text += _early_end_message(event, start, options) + "\n"
    text += _exit_line(event)
    structured = {
        "exit_code": event.exit_code,
        "signal": event.signal,
        "reason": event.reason,
        "duration_ms": event.duration_ms,
        "stdout_bytes": event.stdout_bytes,
        "stderr_bytes": event.stderr_bytes,
        "truncated": digest.cut or event.truncated,
    }
    return ToolOutcome(text, structured, is_error=early)


async def _report_progress(progress: _Progress, report: ProgressReporter, interval: float) -> None:
    """At most one message per ``interval``: the newest output's last lines, or a heartbeat."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        quiet = False
        try:
            await asyncio.wait_for(progress.changed.wait(), timeout=interval * QUIET_HEARTBEAT)
        except TimeoutError:
            quiet = True
        progress.changed.clear()
        elapsed = loop.time() - started
        message = progress.digest.last_lines()
        if progress.waiting is not None:
            message = f"waiting for the workspace: {progress.waiting}"
        elif quiet or not message:
            message = f"running for {elapsed:.0f} s" + (f"; last output:\n{message}" if message else "")
        try:
            await report(elapsed, message)
        except Exception:  # the client's stream is gone: the call ends anyway, stop reporting
            log.debug("progress not delivered; no more progress for this call", exc_info=True)
            return
        await asyncio.sleep(interval)


async def _consume(
    target: ToolTarget, arguments: ExecArguments, options: ToolOptions, progress: _Progress
) -> ToolOutcome:
    events = target.exec(
        arguments.argv_list(),
        workdir=arguments.workdir or options.workdir,
        env=arguments.env,
        stdin=arguments.stdin,
        timeout=arguments.timeout,
    )
    async with events:  # leaving early (a cancelled call) closes the request: the command ends
        return await _collect(events, progress, options)


async def _collect(events: ExecEvents, progress: _Progress, options: ToolOptions) -> ToolOutcome:
    start: StartEvent | None = None
    async for event in events:
        if isinstance(event, OutputEvent):
            progress.digest.feed(event.type, event.payload())
            progress.changed.set()
        elif isinstance(event, WaitingEvent):
            progress.waiting = event.message
            progress.changed.set()
        elif isinstance(event, StartEvent):
            start = event
            progress.waiting = None
        elif isinstance(event, ExitEvent):
            exec_id = start.exec_id if start else None
            log.info("mcp exec finished", extra={"exec_id": exec_id, "outcome": event.reason})
            return exit_outcome(event, progress.digest, start, options)
    raise ProxyProtocolError("the event stream ended without an exit event")


async def run_exec(
    target: ToolTarget,
    arguments: ExecArguments,
    options: ToolOptions,
    report: ProgressReporter | None,
) -> ToolOutcome:
    """Run one command to its end; cancelling this coroutine ends the command (client_gone)."""
    progress = _Progress(OutputDigest(options.max_output_chars))
    reporter: asyncio.Task[None] | None = None
    if report is not None:
        reporter = asyncio.create_task(
            _report_progress(progress, report, options.progress_interval), name="mcp-exec-progress"
        )
    try:
        return await _consume(target, arguments, options, progress)
    except ProxyRefused as error:
        return ToolOutcome(refusal_message(error), is_error=True)
    except ProxyUnreachable as error:
        return ToolOutcome(f"not run: {error}. Is the session-proxy sidecar running?", is_error=True)
    except ProxyClientError as error:
        return ToolOutcome(
            f"error: the connection to the proxy broke off ({error}); the command's outcome is "
            "unknown. Check with `status` before running it again.",
            is_error=True,
        )
    finally:
        if reporter is not None:
            reporter.cancel()  # not awaited: this may run inside a cancelled scope
