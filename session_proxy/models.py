"""The wire contract of the exec API (v1): the request body and the NDJSON events.

These models are the single source of the OpenAPI document and of the client's parser, so the
server, the docs and the client cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_ARGS = 4096
MAX_ARGV_BYTES = 256 * 1024
MAX_ENV_VARS = 256
MAX_PATH_BYTES = 4096
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

ExitReason = Literal[
    "exited",
    "timeout",
    "idle_timeout",
    "output_limit",
    "shutdown",
    "transport_lost",
    "pod_gone",
    "error",
]


class RequestJsonError(ValueError):
    """The body is not JSON this API reads: not JSON at all, ambiguous, or nested too deeply."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers of one document must never see two different requests: with duplicates,
    # some parsers keep the first value and some the last, so refuse them outright.
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise RequestJsonError(f"duplicate key {key[:100]!r}: a name may appear only once in an object")
        document[key] = value
    return document


def _no_constant(name: str) -> Any:
    raise RequestJsonError(f"{name} is not JSON (JSON numbers are finite)")


def load_request_json(body: bytes) -> Any:
    """Parse a request body as strict JSON: no duplicate keys, no NaN/Infinity, bounded nesting.

    The standard library parses it because it keeps lone surrogates, which carry raw bytes
    (``\\udcff`` is byte 0xff, as in ``os.fsdecode``); pydantic's parser refuses them.
    """
    try:
        return json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RequestJsonError:
        raise
    except RecursionError:
        raise RequestJsonError("body is nested too deeply to be a request") from None
    except (ValueError, UnicodeDecodeError) as error:
        # ValueError also covers integers of more than 4300 digits (int's own limit).
        raise RequestJsonError(f"body is not valid JSON: {str(error)[:200]}") from None


def _reject_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} has a lone surrogate; only \\udc80-\\udcff (raw bytes 0x80-0xff) may appear"
        ) from None
    return value


class ExecRequest(BaseModel):
    """Body of ``POST /exec``. Strict: unknown fields and wrong types are refused, not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)

    command: list[str] = Field(
        ...,
        min_length=1,
        max_length=MAX_ARGS,
        description="argv; never a shell string (use ['sh','-c','...'] to ask for a shell)",
    )
    workdir: str | None = Field(None, description="absolute working directory")
    env: dict[str, str] = Field(
        default_factory=dict, max_length=MAX_ENV_VARS, description="extra environment variables"
    )
    stdin: str | None = Field(None, description="text fed to the command's stdin, then EOF")

    stdin_b64: str | None = Field(None, description="bytes (base64) fed to stdin, then EOF")
    timeout: float | None = Field(
        None, gt=0, description="wall-clock seconds; default and maximum come from the config"
    )

    @field_validator("command")
    @classmethod
    def _command_is_sane(cls, command: list[str]) -> list[str]:
        if not command[0]:
            raise ValueError("command[0] (the program) must not be empty")
        total = 0
        for index, argument in enumerate(command):
            _reject_nul(argument, f"command[{index}]")
            total += len(argument.encode("utf-8", "surrogateescape")) + 1
        if total > MAX_ARGV_BYTES:
            raise ValueError(f"command is {total} bytes; at most {MAX_ARGV_BYTES} are allowed")
        return command

    @field_validator("workdir")
    @classmethod
    def _workdir_is_absolute(cls, workdir: str | None) -> str | None:
        if workdir is None:
            return None
        _reject_nul(workdir, "workdir")
        if not workdir.startswith("/"):
            raise ValueError("workdir must be an absolute path (start with '/')")
        # Measured as the bytes it stands for: \udc80-\udcff are raw bytes, as in argv and env.
        if len(workdir.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise ValueError(f"workdir is longer than {MAX_PATH_BYTES} bytes")
        return workdir

    @field_validator("env")
    @classmethod
    def _env_is_sane(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"env name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
            _reject_nul(value, f"env[{name!r}]")
        return env

    @field_validator("stdin")
    @classmethod
    def _stdin_encodes(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise ValueError("stdin has a lone surrogate; send bytes as stdin_b64") from None
        return value

    @field_validator("stdin_b64")
    @classmethod
    def _stdin_b64_decodes(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except binascii.Error:
                raise ValueError("stdin_b64 is not valid base64") from None
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_within_maximum(cls, value: float | None, info: ValidationInfo) -> float | None:
        maximum = (info.context or {}).get("max_timeout")
        if value is not None and maximum is not None and value > maximum:
            raise ValueError(f"timeout may be at most {maximum:g} seconds (the configured maximum)")
        return value

    @model_validator(mode="after")
    def _one_stdin(self) -> ExecRequest:
        if self.stdin is not None and self.stdin_b64 is not None:
            raise ValueError("give stdin or stdin_b64, not both")
        return self

    def stdin_bytes(self) -> bytes | None:
        if self.stdin_b64 is not None:
            return base64.b64decode(self.stdin_b64)
        if self.stdin is not None:
            return self.stdin.encode("utf-8", "surrogateescape")
        return None


class Guarantees(BaseModel):
    """Which parts of the contract hold for this target (an image may lack tools)."""

    workdir: bool
    env: bool
    stdin: bool
    kill: bool
    runner: Literal["supervisor", "shell", "none", "local"] = Field(
        description="what runs the command: the workspace supervisor, the shell wrapper, nothing "
        "(a bare exec), or the local backend"
    )


class StartEvent(BaseModel):
    type: Literal["start"] = "start"
    exec_id: str
    target: str = Field(description="where the command runs: ns/pod/container, or local:<root>")
    timeout: float
    guarantees: Guarantees
    warm: bool = Field(False, description="the command started on a pre-opened (warm) exec, not a new one")


class WaitingEvent(BaseModel):
    type: Literal["waiting"] = "waiting"
    message: str


class OutputEvent(BaseModel):
    """A chunk of output: UTF-8 text in ``data``, anything else base64 in ``data_b64``."""

    type: Literal["stdout", "stderr"]
    data: str | None = None
    data_b64: str | None = None

    def payload(self) -> bytes:
        if self.data_b64 is not None:
            return base64.b64decode(self.data_b64)
        return (self.data or "").encode("utf-8")


class ExitEvent(BaseModel):
    type: Literal["exit"] = "exit"
    exit_code: int | None
    signal: int | None = Field(description="number of the signal that killed the command")
    reason: ExitReason
    duration_ms: int
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool
    message: str | None = Field(None, description="what went wrong, for reason 'error' and others")


Event = Annotated[StartEvent | WaitingEvent | OutputEvent | ExitEvent, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. 'invalid_request'")
    message: str = Field(description="what was wrong and what to do")
    fields: list[dict[str, str]] | None = Field(
        None, description="for 422: each invalid field ('field') and why ('reason')"
    )
    retry_after: float | None = Field(None, description="for 429 and 503: seconds to wait")


class ErrorBody(BaseModel):
    error: ErrorDetail


class StatusResponse(BaseModel):
    version: str
    backend: str
    ready: bool
    in_flight: int
    max_concurrent: int
    jobs_running: int = Field(description="background jobs running now")
    max_jobs: int = Field(description="the cap on background jobs (--max-jobs)")
    draining: bool
    target: dict[str, Any] = Field(description="backend-specific description of the target")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
