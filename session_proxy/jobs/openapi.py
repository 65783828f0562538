"""The background jobs' part of the OpenAPI document: their paths and schemas."""

from __future__ import annotations

import copy
from typing import Any, Final

from pydantic import BaseModel

from ..models import ErrorBody
from .models import CursorEvent, JobDocument, JobExitEvent, JobList, JobOutputEvent, LostEvent

REF: Final = "#/components/schemas/{model}"
JOB_ID: Final = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
EVENT_MODELS: Final = (JobOutputEvent, LostEvent, JobExitEvent, CursorEvent)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(**codes: str) -> dict[str, Any]:
    return {code: _json(ErrorBody.__name__, text) for code, text in codes.items()}


GUARDED: Final = {
    "401": "No or wrong bearer token, when --auth-token-file is set (unauthorized)",
    "403": "Refused by a guard (bad_host, browser_request, bad_target)",
}
NOT_FOUND: Final = {
    "404": "No such job: never started, or ended more than --job-retention ago (job_not_found)",
}


def job_components() -> tuple[list[type[BaseModel]], dict[str, Any]]:
    """The models to generate, and ``JobEvent``: the union of a read's events."""
    return [JobDocument, JobList, *EVENT_MODELS], {
        "JobEvent": {
            "oneOf": [_ref(m.__name__) for m in EVENT_MODELS],
            "discriminator": {"propertyName": "type"},
        },
    }


def job_request_schema(exec_request: dict[str, Any], max_job_duration: float | None) -> dict[str, Any]:
    """``ExecRequest``'s schema with ``timeout`` bounded by ``--max-job-duration`` instead."""
    schema = copy.deepcopy(exec_request)
    schema["title"] = "JobRequest"
    timeout = schema["properties"]["timeout"]["anyOf"][0]
    timeout.pop("maximum", None)
    if max_job_duration is not None:
        timeout["maximum"] = max_job_duration
    schema["properties"]["timeout"]["description"] = (
        "seconds the job may run, counted from its start; default and maximum: --max-job-duration"
    )
    return schema


def job_paths() -> dict[str, Any]:
    read_query = [
        {
            "name": stream,
            "in": "query",
            "description": f"offset in {stream} to read from (default 0; at most what was written)",
            "schema": {"type": "integer", "minimum": 0},
        }
        for stream in ("stdout", "stderr")
    ] + [
        {
            "name": "wait",
            "in": "query",
            "description": "with nothing new at the offsets, wait up to this many seconds for output",
            "schema": {"type": "number", "minimum": 0, "maximum": 300},
        },
        {
            "name": "follow",
            "in": "query",
            "description": "stream output as it comes until the job ends (true), or answer at once",
            "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
        },
        {
            "name": "limit",
            "in": "query",
            "description": "at most this many bytes per stream per read (default: the ring size)",
            "schema": {"type": "integer", "minimum": 0},
        },
    ]
    job_answer = _json(JobDocument.__name__, "The job")
    return {
        "/jobs": {
            "post": {
                "summary": "Start a background job",
                "description": (
                    "The body and checks of POST /exec (timeout bounded by --max-job-duration, its "
                    "default too); answers once the command runs or waits for the workspace."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("JobRequest")}},
                },
                "responses": {
                    "201": {**_json(JobDocument.__name__, "Started; Location: /jobs/{job_id}")},
                    **_errors(
                        **GUARDED,
                        **{
                            "400": "Body is not strict JSON (malformed_request)",
                            "408": "The body did not arrive within --body-timeout (body_timeout)",
                            "413": "Body larger than the configured maximum (body_too_large)",
                            "415": "Not application/json (unsupported_media_type, content_encoding, "
                            "transfer_encoding)",
                            "422": "A field is invalid; `fields` says which and why (invalid_request)",
                            "429": "--max-jobs jobs run (job_limit), or over the rate (rate_limited)",
                            "502": "The backend failed (backend_error)",
                            "503": "Workspace not ready or proxy shutting down (not_ready, shutting_down)",
                        },
                    ),
                },
            },
            "get": {
                "summary": "Running jobs and ended ones still kept",
                "responses": {"200": _json(JobList.__name__, "The jobs, oldest first"), **_errors(**GUARDED)},
            },
        },
        "/jobs/{job_id}": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "One job: state, offsets, exit event once ended",
                "responses": {"200": job_answer, **_errors(**GUARDED, **NOT_FOUND)},
            },
            "delete": {
                "summary": "End the job (TERM, grace, KILL; the whole group); answers once it is gone",
                "responses": {"200": job_answer, **_errors(**GUARDED, **NOT_FOUND)},
            },
        },
        "/jobs/{job_id}/output": {
            "parameters": [JOB_ID],
            "get": {
                "summary": "The job's output from offsets",
                "description": (
                    "NDJSON: `lost` events for bytes that fell out of the ring, `stdout`/`stderr` "
                    "events with their offsets, the `exit` event once the job ended and all was "
                    "read, and always one `cursor` event last, with the offsets to read on from."
                ),
                "parameters": read_query,
                "responses": {
                    "200": {
                        "description": "Event stream, one JSON object per line",
                        "content": {"application/x-ndjson": {"schema": _ref("JobEvent")}},
                    },
                    **_errors(
                        **GUARDED,
                        **NOT_FOUND,
                        **{
                            "422": "A query parameter is invalid (invalid_request)",
                            "505": "Not HTTP/1.1 (http_version)",
                        },
                    ),
                },
            },
        },
    }
