"""The tools' inputs and options, as pydantic models (their JSON schemas are the tools' schemas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MAX_OUTPUT_CHARS: Final = 30_000
MAX_LOG_LINES: Final = 10_000  # what GET /logs accepts


@dataclass(frozen=True)
class ToolOptions:
    """What the tools need to know about the proxy behind them (None: the proxy's own default)."""

    workdir: str | None = None
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    default_timeout: float | None = None
    max_timeout: float | None = None
    progress_interval: float = 1.0


class ExecArguments(BaseModel):
    """Arguments of the ``exec`` tool; checked again by the exec API itself."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(
        None,
        min_length=1,
        description="Shell command line, run as `sh -c <command>` in the workspace. Give this or `argv`.",
    )
    argv: list[str] | None = Field(
        None,
        min_length=1,
        description="The program and its arguments, run without a shell (for images without `sh`). "
        "Give this or `command`.",
    )
    workdir: str | None = Field(
        None, description="Absolute working directory; default: the workspace directory."
    )
    timeout: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="Seconds before the command and everything it started are ended; "
        "default and maximum are the proxy's.",
    )
    env: dict[str, str] | None = Field(None, description="Extra environment variables for the command.")
    stdin: str | None = Field(None, description="Text fed to the command's standard input, then EOF.")
    background: bool = Field(
        False,
        description="Run it as a background job (a server, a watcher, a long test run): the call "
        "returns at once with the job's id, its first output and offsets; read more with "
        "`job_output`, end it with `job_end`. It runs until it exits, `job_end`, its `timeout` "
        "(default: the proxy's maximum job duration) or the proxy stops.",
    )

    @model_validator(mode="after")
    def _one_command(self) -> ExecArguments:
        if (self.command is None) == (self.argv is None):
            raise ValueError("give exactly one of `command` (a shell string) or `argv` (a list)")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ValueError("`workdir` must be an absolute path")
        return self

    def argv_list(self) -> list[str]:
        if self.command is not None:
            return ["sh", "-c", self.command]
        assert self.argv is not None
        return self.argv


class LogsArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tail: int = Field(100, ge=0, le=MAX_LOG_LINES, description="How many lines from the end of the log.")
