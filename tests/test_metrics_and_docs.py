"""Metrics count what happened; /status, /openapi.json and the exec log line tell the truth."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import aiohttp
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ProxyFactory, RunningProxy, exec_events, final


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_after_a_few_execs(http: aiohttp.ClientSession, make_proxy: ProxyFactory) -> None:
    """Outcomes, bytes by stream, durations, rejections and build info add up after known execs."""
    proxy = await make_proxy(max_output_bytes=10)
    await exec_events(http, proxy, {"command": ["sh", "-c", "printf abc; printf de >&2"]})
    await exec_events(http, proxy, {"command": ["sh", "-c", "exit 3"]})
    await exec_events(http, proxy, {"command": ["sleep", "5"], "timeout": 0.2})
    await exec_events(http, proxy, {"command": ["sh", "-c", "printf 0123456789abcdef"]})
    async with http.post(f"{proxy.url}/exec", json={"command": []}) as response:
        assert response.status == 422
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        values = samples(await response.text())
    assert values[("session_proxy_exec_requests_total", (("outcome", "exited"),))] == 2
    assert values[("session_proxy_exec_requests_total", (("outcome", "timeout"),))] == 1
    assert values[("session_proxy_exec_requests_total", (("outcome", "output_limit"),))] == 1
    assert values[("session_proxy_output_bytes_total", (("stream", "stdout"),))] == 3 + 10
    assert values[("session_proxy_output_bytes_total", (("stream", "stderr"),))] == 2
    assert values[("session_proxy_exec_duration_seconds_count", ())] == 4
    assert values[("session_proxy_rejections_total", (("reason", "invalid_request"),))] == 1
    assert values[("session_proxy_exec_in_flight", ())] == 0
    assert values[("session_proxy_exec_in_flight_limit", ())] == 10
    assert values[("session_proxy_exec_start_latency_seconds_count", (("path", "cold"),))] == 4
    assert values[("session_proxy_exec_start_latency_seconds_count", (("path", "warm"),))] == 0
    assert values[("session_proxy_workspace_ready", ())] == 1
    build = [k for k in values if k[0] == "session_proxy_build_info"]
    assert build == [("session_proxy_build_info", (("backend", "local"), ("version", "0.1.0")))]


async def test_each_app_has_its_own_registry(http: aiohttp.ClientSession, make_proxy: ProxyFactory) -> None:
    """Two proxies in one process do not share counters (no global registry): an exec on the
    first is counted there and not on the second, whose exposition is otherwise complete."""
    first = await make_proxy()
    second = await make_proxy()
    await exec_events(http, first, {"command": ["true"]})
    exposed = {}
    for name, proxy in (("first", first), ("second", second)):
        async with http.get(f"{proxy.ops_url}/metrics") as response:
            assert response.status == 200
            exposed[name] = samples(await response.text())
    executed = ("session_proxy_exec_requests_total", (("outcome", "exited"),))
    assert exposed["first"][executed] == 1
    assert exposed["second"][executed] == 0  # watched series exist from the start, at 0
    assert exposed["second"][("session_proxy_exec_in_flight", ())] == 0
    assert ("session_proxy_build_info", (("backend", "local"), ("version", "0.1.0"))) in exposed["second"]


async def test_status_describes_the_backend(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """/status names the backend, readiness and limits."""
    async with http.get(f"{proxy.url}/status") as response:
        status = await response.json()
    assert status["backend"] == "local"
    assert status["ready"] is True
    assert status["in_flight"] == 0
    assert status["max_concurrent"] == 10
    assert status["draining"] is False
    assert status["target"]["root"] == str(tmp_path.resolve())


async def test_openapi_document_is_valid_and_complete(
    http: aiohttp.ClientSession, proxy: RunningProxy
) -> None:
    """/openapi.json is a valid OpenAPI 3.1 document covering every endpoint and error status."""
    async with http.get(f"{proxy.url}/openapi.json") as response:
        document = await response.json()
    validate(document)
    assert set(document["paths"]) == {
        "/exec", "/status", "/logs", "/healthz", "/openapi.json",
        "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/output",
    }  # fmt: skip
    exec_responses = document["paths"]["/exec"]["post"]["responses"]
    assert set(exec_responses) == {
        "200", "400", "401", "403", "408", "413", "415", "422", "429", "502", "503", "505"
    }  # fmt: skip
    schemas = document["components"]["schemas"]
    assert schemas["ExecRequest"]["additionalProperties"] is False
    for name in ("StartEvent", "OutputEvent", "ExitEvent", "WaitingEvent", "ErrorBody"):
        assert name in schemas


async def test_probes_report_readiness(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """/healthz and /readyz answer 200 on the ops listener while the proxy serves."""
    async with http.get(f"{proxy.ops_url}/readyz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ready"
    async with http.get(f"{proxy.ops_url}/healthz") as response:
        assert (await response.json())["status"] == "ok"


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_one_log_line_per_exec_with_digest(
    http: aiohttp.ClientSession, proxy: RunningProxy, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    """Each exec logs one line with id, digest, outcome and bytes; the argv only at debug level.
    The digest is a SHA-256 of the command: the same for the same argv, different otherwise."""
    caplog.set_level(level, logger="session_proxy.streaming")
    events = await exec_events(http, proxy, {"command": ["echo", "s3cret-argument"]})
    records = [r for r in caplog.records if r.getMessage() == "exec finished"]
    assert len(records) == 1
    record = records[0].__dict__
    assert record["exec_id"] == events[0]["exec_id"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", record["argv_sha256"])
    assert record["outcome"] == "exited"
    assert record["exit_code"] == 0
    assert record["stdout_bytes"] == len("s3cret-argument\n")
    assert final(events)["exit_code"] == 0
    if level == logging.INFO:
        assert "argv" not in record
        assert "s3cret-argument" not in caplog.text
    else:
        assert record["argv"] == ["echo", "s3cret-argument"]
    for command in (
        ["echo", "s3cret-argument"],
        ["echo", "s3cret-argument2"],
        ["echo", "s3cret", "-argument"],
    ):
        await exec_events(http, proxy, {"command": command})
    digests = [r.__dict__["argv_sha256"] for r in caplog.records if r.getMessage() == "exec finished"]
    assert len(digests) == 4
    assert digests[1] == digests[0]
    assert len({digests[0], digests[2], digests[3]}) == 3
