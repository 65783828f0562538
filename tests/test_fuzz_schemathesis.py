"""Schemathesis against /openapi.json: no 5xx, every answer as documented, no traceback logged.

The proxy runs as an unprivileged user on the local backend in a temporary directory, so the
random argv schemathesis generates can do no harm. Rerun with more cases:
``FUZZ_EXAMPLES=1000 python -m pytest -m reliability tests/test_fuzz_schemathesis.py``.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator

from session_proxy.openapi import openapi_document

from .fuzz_proxy import UnprivilegedProxy, unprivileged_proxy

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnprivilegedProxy]:
    with unprivileged_proxy(tmp_path_factory.mktemp("fuzz")) as proxy:
        yield proxy
        assert proxy.problems_in_log() == []


# The document the fuzzed proxy serves (its --max-timeout is 2), built here because the
# schema must exist when the tests are collected; a test checks it is the one served.
DOCUMENT = openapi_document(max_timeout=2, default_timeout=2)
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def tally() -> Counter[tuple[str, int]]:
    """Answers by operation and status, for the report."""
    return Counter()


def _event_validator(document: dict[str, Any]) -> Draft202012Validator:
    root = {"$ref": "#/components/schemas/ExecEvent", "components": document["components"]}
    return Draft202012Validator(root)


@schemathesis.check
def ndjson_events_follow_the_contract(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 200 from /exec is NDJSON: every line a documented event, exactly one exit, last."""
    if response.headers.get("content-type", [""])[0] != "application/x-ndjson":
        return None
    validator = _event_validator(case.operation.schema.raw_schema)
    events = [json.loads(line) for line in response.content.splitlines()]
    for event in events:
        errors = [error.message for error in validator.iter_errors(event)]
        assert not errors, f"event {event} does not match ExecEvent: {errors}"
    types = [event["type"] for event in events]
    assert types.count("exit") == 1, types
    assert types[-1] == "exit", types
    return True


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_generated_request_is_answered_as_documented(
    case: Any, fuzzed: UnprivilegedProxy, tally: Counter[tuple[str, int]]
) -> None:
    """Generated requests (valid and invalid): never a 5xx, every answer matches the document."""
    response = case.call_and_validate(
        base_url=fuzzed.url, timeout=30, additional_checks=[ndjson_events_follow_the_contract]
    )
    tally[(case.operation.label, response.status_code)] += 1


def test_the_fuzzed_document_is_the_served_one(fuzzed: UnprivilegedProxy) -> None:
    """What schemathesis works from is exactly what the fuzzed proxy serves."""
    with urllib.request.urlopen(f"{fuzzed.url}/openapi.json", timeout=10) as response:
        assert json.loads(response.read()) == json.loads(json.dumps(DOCUMENT))


def test_the_fuzzed_proxy_logged_no_traceback(
    fuzzed: UnprivilegedProxy, tally: Counter[tuple[str, int]]
) -> None:
    """After the run the proxy's log has no error and no traceback (checked again at shutdown)."""
    print(f"\nschemathesis: {sum(tally.values())} requests", dict(sorted(tally.items())))
    assert not [key for key in tally if key[1] >= 500]
    assert fuzzed.log_lines(), "the fuzzed proxy logged nothing at all"
    assert fuzzed.problems_in_log() == []
