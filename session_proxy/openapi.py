"""The OpenAPI 3.1 document of the exec API, generated from the wire models."""

from __future__ import annotations

import functools
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import __version__
from .models import (
    ErrorBody,
    ExecRequest,
    ExitEvent,
    HealthResponse,
    OutputEvent,
    StartEvent,
    StatusResponse,
    WaitingEvent,
)

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "Body is not strict JSON: not JSON, a duplicate key, NaN/Infinity, nested too deeply "
    "(malformed_request); or the request is not valid HTTP/1.1 (malformed_http)",
    "401": "No or wrong bearer token, when --auth-token-file is set (unauthorized)",
    "403": "Refused by a guard: Host not loopback, browser Origin or Sec-Fetch-Site, or a request "
    "target naming another host (bad_host, browser_request, bad_target)",
    "408": "The body did not arrive within --body-timeout (body_timeout); the connection is closed",
    "413": "Body larger than the configured maximum (body_too_large)",
    "415": "Content-Type not application/json (unsupported_media_type), any Content-Encoding "
    "(content_encoding), a Transfer-Encoding other than chunked (transfer_encoding)",
    "422": "A field is invalid; `fields` says which and why (invalid_request)",
    "429": "Rate or concurrency limit; see Retry-After (rate_limited, concurrency_limit)",
    "502": "The backend (Kubernetes API server) failed (backend_error)",
    "503": "Workspace not ready or proxy shutting down; see Retry-After (not_ready, shutting_down)",
    "505": "Not HTTP/1.1: the event stream is chunked, which needs HTTP/1.1 (http_version)",
}
# What the server refuses beyond the models' types, in JSON Schema terms, so that a body the
# document accepts is one the server accepts (byte lengths, checked in UTF-8, and lone
# surrogates other than \udc80-\udcff cannot be said in JSON Schema; the descriptions say it).
# `$(?!\n)`: the end in both ECMA-262 and Python, whose `$` also matches before a final newline.
NO_NUL: Final = "^[^\\x00]*$"
ABSOLUTE_PATH: Final = "^/[^\\x00]*$"
ENV_NAME: Final = "^[A-Za-z_][A-Za-z0-9_]*$(?!\\n)"
BASE64: Final = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$(?!\\n)"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _error_responses(*codes: str) -> dict[str, Any]:
    return {code: _json(ErrorBody, ERRORS[code]) for code in codes}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}], "default": None}


def _exec_request_schema(
    schema: dict[str, Any], max_timeout: float | None, default_timeout: float | None
) -> None:
    """Add to the request body's schema every rule the server checks that JSON Schema can say."""
    properties = schema["properties"]
    argument = {"type": "string", "pattern": NO_NUL}
    properties["command"].update(
        prefixItems=[{**argument, "minLength": 1}],
        items=argument,
        description=properties["command"]["description"]
        + "; the program (first item) non-empty; no NUL; at most 256 KiB in all (UTF-8)",
    )
    workdir = {"type": "string", "pattern": ABSOLUTE_PATH, "maxLength": 4096}
    properties["workdir"].update(
        _nullable(workdir), description="absolute working directory, at most 4096 bytes (UTF-8), no NUL"
    )
    properties["env"].update(
        propertyNames={"pattern": ENV_NAME},
        additionalProperties={"type": "string", "pattern": NO_NUL},
    )
    properties["stdin_b64"].update(_nullable({"type": "string", "pattern": BASE64}))
    timeout: dict[str, Any] = {"type": "number", "exclusiveMinimum": 0}
    if max_timeout is not None:
        timeout["maximum"] = max_timeout
    properties["timeout"].update(_nullable(timeout))
    if default_timeout is not None:
        properties["timeout"]["default"] = default_timeout  # what an absent or null timeout means
    both_stdins = {"stdin": {"type": "string"}, "stdin_b64": {"type": "string"}}
    schema["not"] = {"required": ["stdin", "stdin_b64"], "properties": both_stdins}


@functools.cache
def openapi_document(
    max_timeout: float | None = None, default_timeout: float | None = None
) -> dict[str, Any]:
    """The document; the server's ``max_timeout`` bounds ``timeout`` in the schema, its
    ``default_timeout`` is the default there (``session-proxy mcp`` reads both from it)."""
    models: list[type[BaseModel]] = [
        ExecRequest,
        StartEvent,
        WaitingEvent,
        OutputEvent,
        ExitEvent,
        ErrorBody,
        StatusResponse,
        HealthResponse,
    ]
    _, schema = models_json_schema([(m, "serialization") for m in models], ref_template=REF)
    schemas = schema["$defs"]
    _exec_request_schema(schemas["ExecRequest"], max_timeout, default_timeout)
    event_union = {"oneOf": [_ref(m) for m in (StartEvent, WaitingEvent, OutputEvent, ExitEvent)]}
    schemas["ExecEvent"] = {**event_union, "discriminator": {"propertyName": "type"}}
    guarded = _error_responses("401", "403")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "session-proxy exec API",
            "version": __version__,
            "description": "Runs commands in the session's workspace and streams their output.",
        },
        "paths": {
            "/exec": {
                "post": {
                    "summary": "Run a command and stream its output",
                    "description": (
                        "Answers with NDJSON: one `start` event (maybe `waiting` events before it), "
                        "`stdout`/`stderr` events as output arrives, then exactly one `exit` event."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(ExecRequest)}},
                    },
                    "responses": {
                        "200": {
                            "description": "Event stream, one JSON object per line",
                            "content": {
                                "application/x-ndjson": {"schema": {"$ref": REF.format(model="ExecEvent")}}
                            },
                        },
                        **_error_responses(
                            "400", "401", "403", "408", "413", "415", "422", "429", "502", "503", "505"
                        ),
                    },
                }
            },
            "/status": {
                "get": {
                    "summary": "Backend and target state",
                    "responses": {"200": _json(StatusResponse, "Current state"), **guarded},
                }
            },
            "/logs": {
                "get": {
                    "summary": "The workspace container's log (kubernetes backend)",
                    "parameters": [
                        {
                            "name": "tail",
                            "in": "query",
                            "description": "how many lines from the end (0-10000, default 100)",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 10000},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The log lines",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "404": _json(ErrorBody, "This backend has no workspace log (local)"),
                        **_error_responses("401", "403", "422", "502", "503"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": _json(HealthResponse, "The proxy answers"), **guarded},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **guarded,
                    },
                }
            },
        },
        "components": {"schemas": schemas},
    }
