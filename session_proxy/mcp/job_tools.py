"""The background-job tools: ``exec`` with ``background``, ``job_output`` and ``job_end``.

A background job is an exec that outlives the tool call: ``exec`` answers at once with the
job's id, its first output and the offsets to read on from; ``job_output`` returns what the job
wrote after given offsets (optionally only the lines matching a pattern) and the next offsets;
``job_end`` ends the job and everything it started. Free of the MCP SDK's server, like
``exec_tool``: each call returns a ``ToolOutcome``.
"""

from __future__ import annotations

import base64
import copy
import re
from typing import Any, Final

import mcp_types as types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..client import ExecClient, ProxyClientError, ProxyRefused
from ..jobs.models import CursorEvent, JobDocument, JobExitEvent, JobOutputEvent, LostEvent
from .arguments import ExecArguments, ToolOptions
from .exec_tool import ToolOutcome, refusal_message

FIRST_OUTPUT_WAIT: Final = 3.0  # seconds `exec` with `background` waits for the job's first output
MAX_READ_WAIT: Final = 60.0
JOB_TOOLS: Final = ("job_output", "job_end")


class JobOutputArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(..., min_length=1, max_length=64, description="The id `exec` returned.")
    stdout_offset: int = Field(
        0, ge=0, description="Read stdout from this byte offset: the `stdout_offset` the last call returned."
    )
    stderr_offset: int = Field(
        0, ge=0, description="Read stderr from this byte offset: the `stderr_offset` the last call returned."
    )
    wait: float = Field(
        0,
        ge=0,
        le=MAX_READ_WAIT,
        description="When there is no new output yet, wait up to this many seconds for some.",
    )
    grep: str | None = Field(
        None,
        description="Only return lines matching this regular expression (Python syntax); the "
        "offsets still move past everything read.",
    )

    @field_validator("grep")
    @classmethod
    def _grep_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"`grep` is not a valid regular expression: {error}") from None
        return value


class JobEndArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(..., min_length=1, max_length=64, description="The id `exec` returned.")


BACKGROUND_RESULT: Final = {
    "job_id": {"type": "string", "description": "with `background`: the job's id"},
    "stdout_offset": {"type": "integer", "description": "with `background`: read stdout on from here"},
    "stderr_offset": {"type": "integer", "description": "with `background`: read stderr on from here"},
    "ended": {"type": "boolean", "description": "with `background`: the job has already ended"},
}


def with_background(exec_schema: dict[str, Any]) -> dict[str, Any]:
    """The ``exec`` result schema, also fitting a background start's result (``reason`` null
    while the job runs, and where to read on)."""
    schema = copy.deepcopy(exec_schema)
    properties = schema["properties"]
    properties["reason"] = {"anyOf": [properties["reason"], {"type": "null"}]}
    properties.update(BACKGROUND_RESULT)
    return schema


def job_tool_list() -> list[types.Tool]:
    return [
        types.Tool(
            name="job_output",
            title="Read a background job's output",
            description="New output of a background job (started with `exec` and `background: "
            "true`). Pass the `stdout_offset` and `stderr_offset` from the previous `exec` or "
            "`job_output` result to get only what came after; the result gives the next offsets, "
            "the job's state, and its exit code once it has ended. Use `grep` to see only matching "
            "lines (say, errors in a server log) and `wait` to wait for output that has not come yet.",
            input_schema=JobOutputArguments.model_json_schema(),
            annotations=types.ToolAnnotations(
                read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
            ),
        ),
        types.Tool(
            name="job_end",
            title="End a background job",
            description="End a background job and every process it started (TERM, then KILL after "
            "a grace period). Call it when you no longer need the server or watcher, before you "
            "finish. Returns how the job ended.",
            input_schema=JobEndArguments.model_json_schema(),
            annotations=types.ToolAnnotations(
                read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
            ),
        ),
    ]


class _Read:
    """One read of a job's output, shaped as text for a model."""

    def __init__(self, grep: str | None) -> None:
        self.pattern = re.compile(grep) if grep is not None else None
        self.output: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.lost: dict[str, int] = {"stdout": 0, "stderr": 0}
        self.exit: JobExitEvent | None = None
        self.cursor: CursorEvent | None = None

    def take(self, event: object) -> None:
        if isinstance(event, JobOutputEvent):
            data = (
                base64.b64decode(event.data_b64)
                if event.data_b64 is not None
                else (event.data or "").encode()
            )
            self.output[event.type] += data
        elif isinstance(event, LostEvent):
            self.lost[event.stream] += event.bytes
        elif isinstance(event, JobExitEvent):
            self.exit = event
        elif isinstance(event, CursorEvent):
            self.cursor = event

    def text(self, job_id: str) -> str:
        assert self.cursor is not None
        parts = []
        for stream, data in self.output.items():
            if self.lost[stream]:
                parts.append(f"({self.lost[stream]} bytes of {stream} fell out of the job's buffer unread)")
            lines = data.decode("utf-8", "replace").splitlines(keepends=True)
            if self.pattern is not None:
                lines = [line for line in lines if self.pattern.search(line)]
            if lines:
                parts.append(f"[{stream}]\n" + "".join(lines).rstrip("\n"))
        if not any(self.output.values()):
            parts.append("(no new output)")
        elif len(parts) == sum(1 for s in self.lost.values() if s):
            parts.append("(no new line matched `grep`)")
        cursor = self.cursor
        if self.exit is not None:
            code = self.exit.exit_code if self.exit.exit_code is not None else "none"
            parts.append(f"job {job_id} has ended ({self.exit.reason}); exit code: {code}")
        else:
            more = "" if cursor.done else " (it is still running)"
            parts.append(
                f"job {job_id}{more}: read on with job_output(job_id={job_id!r}, "
                f"stdout_offset={cursor.stdout}, stderr_offset={cursor.stderr})"
            )
        return "\n".join(parts)

    def structured(self, job_id: str) -> dict[str, Any]:
        """The job so far, in the fields of an ``exec`` result, and where to read on."""
        assert self.cursor is not None
        ended = self.exit
        return {
            "exit_code": ended.exit_code if ended else None,
            "signal": ended.signal if ended else None,
            "reason": ended.reason if ended else None,
            "duration_ms": ended.duration_ms if ended else 0,
            "stdout_bytes": self.cursor.stdout,
            "stderr_bytes": self.cursor.stderr,
            "truncated": any(self.lost.values()),
            "job_id": job_id,
            "stdout_offset": self.cursor.stdout,
            "stderr_offset": self.cursor.stderr,
            "ended": ended is not None,
        }


async def _read(
    client: ExecClient, job_id: str, offsets: tuple[int, int], wait: float, grep: str | None, chars: int
) -> _Read:
    read = _Read(grep)
    stdout, stderr = offsets
    async for event in client.job_output(job_id, stdout=stdout, stderr=stderr, wait=wait, limit=chars // 2):
        read.take(event)
    return read


async def start_background(client: ExecClient, arguments: ExecArguments, options: ToolOptions) -> ToolOutcome:
    """``exec`` with ``background``: start the job, answer with its id and first output."""
    try:
        job: JobDocument = await client.start_job(
            arguments.argv_list(),
            workdir=arguments.workdir or options.workdir,
            env=arguments.env,
            stdin=arguments.stdin,
            timeout=arguments.timeout,
        )
        read = await _read(client, job.job_id, (0, 0), FIRST_OUTPUT_WAIT, None, options.max_output_chars)
    except ProxyRefused as error:
        return ToolOutcome(refusal_message(error), is_error=True)
    except ProxyClientError as error:
        return ToolOutcome(f"not started: {error}", is_error=True)
    text = (
        f"started background job {job.job_id} (ends with `job_end(job_id={job.job_id!r})`, at the "
        f"latest after {job.timeout:g} s). First output:\n{read.text(job.job_id)}"
    )
    return ToolOutcome(text, read.structured(job.job_id))


async def call_job_tool(
    client: ExecClient, name: str, arguments: dict[str, Any], options: ToolOptions
) -> ToolOutcome:
    try:
        if name == "job_output":
            given = JobOutputArguments.model_validate(arguments)
            offsets = (given.stdout_offset, given.stderr_offset)
            read = await _read(
                client, given.job_id, offsets, given.wait, given.grep, options.max_output_chars
            )
            return ToolOutcome(read.text(given.job_id), read.structured(given.job_id))
        ended = await client.end_job(JobEndArguments.model_validate(arguments).job_id)
    except ValidationError as error:
        problems = "; ".join(
            str(p["msg"]).removeprefix("Value error, ") for p in error.errors(include_url=False)
        )
        return ToolOutcome(f"invalid arguments: {problems}", is_error=True)
    except ProxyRefused as error:
        if error.code == "job_not_found":
            return ToolOutcome(
                f"{error.message}. Jobs of this session are listed by none of "
                "these tools; start a new one with `exec` and `background: true`.",
                is_error=True,
            )
        if error.status == 422:
            return ToolOutcome(f"invalid arguments: {error.message}", is_error=True)
        return ToolOutcome(refusal_message(error), is_error=True)
    except ProxyClientError as error:
        return ToolOutcome(f"error: {error}", is_error=True)
    assert ended.exit is not None
    code = ended.exit.exit_code if ended.exit.exit_code is not None else "none"
    text = (
        f"job {ended.job_id} has ended ({ended.exit.reason}), with everything it started; exit code: "
        f"{code}. It wrote {ended.stdout.end} bytes to stdout and {ended.stderr.end} to stderr."
    )
    return ToolOutcome(
        text, {"job_id": ended.job_id, "reason": ended.exit.reason, "exit_code": ended.exit.exit_code}
    )
