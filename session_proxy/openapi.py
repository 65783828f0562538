"""The OpenAPI 3.1 document of the exec API, generated from the wire models."""

from __future__ import annotations

import functools
from typing import Any

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
    "400": "Body is not valid JSON (malformed_request)",
    "401": "No or wrong bearer token, when --auth-token-file is set (unauthorized)",
    "403": "Refused by a guard: Host not loopback, browser Origin or Sec-Fetch-* (bad_host, browser_request)",
    "413": "Body larger than the configured maximum (body_too_large)",
    "415": "Content-Type not application/json, or any Content-Encoding (unsupported_media_type)",
    "422": "A field is invalid; `fields` says which and why (invalid_request)",
    "429": "Rate or concurrency limit; see Retry-After (rate_limited, concurrency_limit)",
    "502": "The backend (Kubernetes API server) failed (backend_error)",
    "503": "Workspace not ready or proxy shutting down; see Retry-After (not_ready, shutting_down)",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _error_responses(*codes: str) -> dict[str, Any]:
    return {code: _json(ErrorBody, ERRORS[code]) for code in codes}


@functools.cache
def openapi_document() -> dict[str, Any]:
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
                        **_error_responses("400", "401", "403", "413", "415", "422", "429", "502", "503"),
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
