"""The wire shapes of background jobs: the job document and the events of its output.

A job's output is read as NDJSON, like an exec's, with each output event carrying the absolute
``offset`` of its first byte in its stream. A read ends with one ``cursor`` event saying where
to read on; when the job has ended and everything was read, the ``exit`` event comes first.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from ..models import ExitReason, Guarantees

JobState = Literal["starting", "running", "ended"]
# Every exec reason, and one of its own: the job was ended by DELETE /jobs/{id}.
JobEndReason = Literal[ExitReason, "killed"]
JOB_STREAMS = ("stdout", "stderr")


class JobStream(BaseModel):
    """Where one stream of a job stands."""

    start: int = Field(description="offset of the oldest byte still kept (bytes before it fell out)")
    end: int = Field(description="offset just past the newest byte: bytes written in all")
    dropped: int = Field(description="bytes that fell out of the ring (--job-output-bytes) unread or not")


class JobExitEvent(BaseModel):
    """How a job ended; the same fields as an exec's ``exit`` event."""

    type: Literal["exit"] = "exit"
    exit_code: int | None
    signal: int | None = Field(description="number of the signal that killed the command")
    reason: JobEndReason = Field(description="an exec's reasons, or 'killed': ended by DELETE /jobs/{id}")
    duration_ms: int
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool = Field(description="bytes fell out of the ring: the output kept is not whole")
    message: str | None = None


class JobDocument(BaseModel):
    job_id: str
    command: list[str]
    state: JobState = Field(description="starting (waiting for the workspace), running, or ended")
    target: str = Field(description="where it runs: ns/pod/container, or local:<root>; '' before it starts")
    warm: bool = Field(description="started on a pre-opened (warm) exec")
    guarantees: Guarantees | None = Field(description="which parts of the contract hold; null before start")
    created: float = Field(description="Unix time the job was asked for")
    timeout: float = Field(description="seconds it may run, counted from its creation")
    stdout: JobStream
    stderr: JobStream
    exit: JobExitEvent | None = Field(description="set once the job has ended")
    waiting: str | None = Field(None, description="while starting: why the start is delayed")


class JobList(BaseModel):
    jobs: list[JobDocument] = Field(description="running jobs and ended ones still kept, oldest first")


class JobOutputEvent(BaseModel):
    """Output bytes: UTF-8 text in ``data``, anything else base64 in ``data_b64``."""

    type: Literal["stdout", "stderr"]
    offset: int = Field(description="offset of this event's first byte in its stream")
    data: str | None = None
    data_b64: str | None = None


class LostEvent(BaseModel):
    """Bytes asked for that fell out of the ring before they were read."""

    type: Literal["lost"] = "lost"
    stream: Literal["stdout", "stderr"]
    offset: int = Field(description="the offset asked for")
    bytes: int = Field(description="how many bytes from there are gone; reading goes on after them")


class CursorEvent(BaseModel):
    """The last event of every read: the offsets to read on from, and whether more can come."""

    type: Literal["cursor"] = "cursor"
    stdout: int
    stderr: int
    done: bool = Field(description="the job ended and all its kept output was sent: no more will come")


JobEvent = Annotated[JobOutputEvent | LostEvent | JobExitEvent | CursorEvent, Field(discriminator="type")]
JOB_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobEvent)
