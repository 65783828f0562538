"""Background jobs on the local backend: they run while other execs do, their output is read
exactly by offset, kept bounded, and every way a job ends takes its whole group."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from session_proxy.keys import JOBS

from .conftest import (
    ProxyFactory,
    RunningProxy,
    exec_events,
    final,
    forking,
    output_of,
    survivors,
    wait_for_processes,
)
from .jobs_api import (
    SERVING,
    JobReader,
    end_job,
    fetch_command,
    http_server,
    job_document,
    read_output,
    start_job,
    wait_ended,
)

GET_LOGGED = re.compile(rb'"GET /\S* HTTP/1\.1" 200')


async def port_refuses(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_server_job_answers_while_execs_run_and_ends_whole(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str, tmp_path: Path
) -> None:
    """A server started as a job answers on its port while another exec runs; its log lines
    are read by offset; DELETE ends it and everything in its group (reason killed)."""
    job = await start_job(http, proxy.url, {"command": http_server(marker)})
    assert job["state"] == "running"
    reader = JobReader(http, proxy.url, job["job_id"])
    port = int((await reader.until(SERVING)).group(1))
    gate = tmp_path / "gate"
    other = asyncio.create_task(
        exec_events(http, proxy, {"command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"]})
    )
    fetched = await exec_events(http, proxy, {"command": fetch_command(f"http://127.0.0.1:{port}/")})
    assert output_of(fetched, "stdout") == b"200\n"
    assert not other.done()
    gate.touch()
    assert final(await other)["exit_code"] == 0
    await reader.until(GET_LOGGED, "stderr")
    ended = await end_job(http, proxy.url, job["job_id"])
    assert ended["exit"]["reason"] == "killed"
    assert (ended["exit"]["exit_code"], ended["exit"]["signal"]) == (None, None)
    assert await survivors(marker, within=5) == []
    assert await port_refuses(port)
    assert (await reader.to_end())["reason"] == "killed"


SAMPLE = "é€😀 text, then bytes: \\377\\376 and a cut char: \\342\\202"


async def test_output_read_in_pieces_is_exact_and_complete(
    http: aiohttp.ClientSession, proxy: RunningProxy
) -> None:
    """Read a few bytes at a time, the output comes back byte for byte, offsets contiguous,
    multi-byte characters whole; the exit event comes once, after the last byte."""
    script = (
        f"i=0; while [ $i -lt 40 ]; do printf '{SAMPLE}%s\\n' $i; printf '{SAMPLE}' >&2; i=$((i+1)); done"
    )
    local = await exec_events(http, proxy, {"command": ["sh", "-c", script]})
    job = await start_job(http, proxy.url, {"command": ["sh", "-c", script]})
    reader = JobReader(http, proxy.url, job["job_id"])
    exit_event = await reader.to_end(limit=7)
    assert reader.output["stdout"] == output_of(local, "stdout")
    assert reader.output["stderr"] == output_of(local, "stderr")
    assert len(reader.output["stdout"]) > 2000
    assert (exit_event["reason"], exit_event["exit_code"]) == ("exited", 0)
    assert exit_event["stdout_bytes"] == len(reader.output["stdout"])
    again = JobReader(http, proxy.url, job["job_id"])
    await again.read()  # everything at once, after the end
    assert again.output == reader.output
    assert again.done


async def test_text_stays_text_when_read_in_pieces(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A character cut by a read's limit is held back for the next read, not sent as base64."""
    job = await start_job(http, proxy.url, {"command": ["printf", "€€€€"]})
    reader = JobReader(http, proxy.url, job["job_id"])
    await reader.to_end(limit=4)
    assert reader.output["stdout"] == "€€€€".encode()
    events = await read_output(http, proxy.url, job["job_id"], limit=4)
    assert [e.get("data") for e in events if e["type"] == "stdout"] == ["€"]


async def test_flooding_job_loses_oldest_bytes_and_says_how_many(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """Output past --job-output-bytes pushes out the oldest bytes: a read from 0 gets a lost
    event with their count, then exactly the newest bytes; the job and metrics count them."""
    proxy = await make_proxy(job_output_bytes=1024)
    script = "i=0; while [ $i -lt 2000 ]; do printf '%05d\\n' $i; i=$((i+1)); done"
    job = await start_job(http, proxy.url, {"command": ["sh", "-c", script]})
    await wait_ended(http, proxy.url, job["job_id"])
    reader = JobReader(http, proxy.url, job["job_id"])
    exit_event = await reader.to_end()
    everything = b"".join(b"%05d\n" % i for i in range(2000))
    assert reader.lost["stdout"] == len(everything) - 1024
    assert reader.output["stdout"] == everything[-1024:]
    assert exit_event["truncated"] is True
    assert exit_event["stdout_bytes"] == len(everything)
    _, document = await job_document(http, proxy.url, job["job_id"])
    assert document["stdout"] == {
        "start": len(everything) - 1024,
        "end": len(everything),
        "dropped": len(everything) - 1024,
    }
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        text = await response.text()
    assert (
        f'session_proxy_job_output_dropped_bytes_total{{stream="stdout"}} {len(everything) - 1024}.0' in text
    )


async def test_kill_sends_term_first(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """Ending a job is TERM first (a server may shut down cleanly), KILL only after the grace."""
    termed = tmp_path / "termed"
    script = f"trap 'touch {termed}; exit 0' TERM; echo ready; while :; do sleep 0.02; done"
    job = await start_job(http, proxy.url, {"command": ["sh", "-c", script]})
    await JobReader(http, proxy.url, job["job_id"]).until(re.compile(b"ready"))
    await end_job(http, proxy.url, job["job_id"])
    assert termed.exists()


async def test_timeout_ends_the_whole_group(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """A job past its timeout ends with reason timeout, and its whole group with it."""
    job = await start_job(http, proxy.url, {"command": forking(marker), "timeout": 1})
    reader = JobReader(http, proxy.url, job["job_id"])
    exit_event = await reader.to_end()
    assert (exit_event["reason"], exit_event["exit_code"]) == ("timeout", None)
    assert await survivors(marker, within=5) == []


async def test_shutdown_ends_every_job_at_once(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession, marker: str, tmp_path: Path
) -> None:
    """Jobs do not outlive the proxy, nor wait for its shutdown grace: when a shutdown begins,
    each ends (reason shutdown), group and all, while an exec still runs in its grace."""
    proxy = await make_proxy(shutdown_grace=60)
    jobs = [await start_job(http, proxy.url, {"command": forking(marker)}) for _ in range(2)]
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done"
    running = await http.post(f"{proxy.url}/exec", json={"command": ["sh", "-c", script]})
    assert json.loads(await running.content.readline())["type"] == "start"
    await wait_for_processes(marker, 4)
    stopping = asyncio.create_task(proxy.server.stop())
    assert await survivors(marker, within=10) == []
    registry = proxy.server.exec_app[JOBS]
    async with asyncio.timeout(10):
        while registry.running:  # the groups are gone; the jobs are writing their exit
            await asyncio.sleep(0.01)
    assert [registry.get(j["job_id"]).exit.reason for j in jobs] == ["shutdown", "shutdown"]  # type: ignore[union-attr]
    gate.touch()  # the exec, in its grace all along, now ends on its own
    async with running:
        assert json.loads((await running.read()).splitlines()[-1])["reason"] == "exited"
    await stopping


async def test_jobs_take_the_rate_limit(http: aiohttp.ClientSession, make_proxy: ProxyFactory) -> None:
    """Starting a job takes a token of the exec rate limit: past it, 429 rate_limited."""
    proxy = await make_proxy(rate_limit=0.01, rate_burst=1, rate_limit_wait=0)
    await start_job(http, proxy.url, {"command": ["true"]})
    async with http.post(f"{proxy.url}/jobs", json={"command": ["true"]}) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (429, "rate_limited")


async def test_max_jobs_holds_with_its_own_count(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """--max-jobs running jobs refuse the next with 429 job_limit, while execs (their own cap,
    here 1) still run; once one job ends, another may start."""
    proxy = await make_proxy(max_jobs=2, max_concurrent=1)
    jobs = [await start_job(http, proxy.url, {"command": ["sleep", marker]}) for _ in range(2)]
    async with http.post(f"{proxy.url}/jobs", json={"command": ["sleep", marker]}) as response:
        error = (await response.json())["error"]
        assert (response.status, error["code"]) == (429, "job_limit")
        assert response.headers["Retry-After"] == "1"
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0
    async with http.get(f"{proxy.url}/status") as response:
        status = await response.json()
    assert (status["jobs_running"], status["max_jobs"], status["in_flight"]) == (2, 2, 0)
    await end_job(http, proxy.url, jobs[0]["job_id"])
    third = await start_job(http, proxy.url, {"command": ["sleep", marker]})
    for job in (jobs[1], third):
        await end_job(http, proxy.url, job["job_id"])
    assert await survivors(marker, within=5) == []
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        text = await response.text()
    assert "session_proxy_jobs_running 0.0" in text
    assert 'session_proxy_jobs_total{outcome="killed"} 3.0' in text
    assert 'session_proxy_rejections_total{reason="job_limit"} 1.0' in text


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"command": []}, 422, "invalid_request"),
        ({"command": ["true"], "workdir": "relative"}, 422, "invalid_request"),
        ({"command": ["true"], "stdin": "a", "stdin_b64": "YQ=="}, 422, "invalid_request"),
        ({"command": ["true"], "timeout": 3601}, 422, "invalid_request"),
        ({"command": ["true"], "surprise": 1}, 422, "invalid_request"),
    ],
)
async def test_jobs_take_the_exec_body_with_every_check(
    http: aiohttp.ClientSession, proxy: RunningProxy, body: dict[str, object], status: int, code: str
) -> None:
    """POST /jobs validates as /exec does (timeout up to --max-job-duration, not --max-timeout)."""
    async with http.post(f"{proxy.url}/jobs", json=body) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (status, code)


async def test_job_refusals_before_the_body(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """Wrong content type (415), unknown job (404 job_not_found), bad read queries (422)."""
    async with http.post(f"{proxy.url}/jobs", data=b'{"command":["true"]}') as response:
        assert response.status == 415
    async with http.get(f"{proxy.url}/jobs/nope/output") as response:
        assert (response.status, (await response.json())["error"]["code"]) == (404, "job_not_found")
    job = await start_job(http, proxy.url, {"command": ["true"], "timeout": 3600})
    for query in ({"stdout": "-1"}, {"stdout": "99"}, {"wait": "nan"}, {"follow": "yes"}, {"offset": "0"}):
        async with http.get(f"{proxy.url}/jobs/{job['job_id']}/output", params=query) as response:
            assert response.status == 422, query


async def test_stdin_then_eof(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A job's stdin is the body's stdin, then closed: `cat` ends on its own."""
    job = await start_job(http, proxy.url, {"command": ["cat"], "stdin": "fed\n"})
    reader = JobReader(http, proxy.url, job["job_id"])
    assert (await reader.to_end())["exit_code"] == 0
    assert reader.output["stdout"] == b"fed\n"


async def test_a_read_waits_for_output(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """With wait, a read at the end waits for the next output instead of answering empty."""
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done; echo late"
    job = await start_job(http, proxy.url, {"command": ["sh", "-c", script]})
    read = asyncio.create_task(read_output(http, proxy.url, job["job_id"], wait=60))
    gate.touch()  # the job needs a poll round and an echo: the read is there first
    events = await read
    assert [e["data"] for e in events if e["type"] == "stdout"] == ["late\n"]


async def test_follow_streams_until_the_end(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """follow=true answers output as it comes, then the exit event and a final cursor."""
    gate = tmp_path / "gate"
    script = f"echo first; while [ ! -e {gate} ]; do sleep 0.02; done; echo second"
    job = await start_job(http, proxy.url, {"command": ["sh", "-c", script]})
    async with http.get(f"{proxy.url}/jobs/{job['job_id']}/output", params={"follow": "true"}) as response:
        first = await response.content.readline()
        assert b'"data":"first\\n"' in first
        gate.touch()
        rest = [line async for line in response.content]
    assert b'"data":"second\\n"' in rest[0]
    assert b'"type":"exit"' in rest[-2]
    assert b'"done":true' in rest[-1]


async def test_ended_jobs_are_listed_then_forgotten(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """An ended job stays listed with its exit event for --job-retention, then is forgotten."""
    proxy = await make_proxy(job_retention=0)
    job = await start_job(http, proxy.url, {"command": ["sleep", "30"]})
    async with http.get(f"{proxy.url}/jobs") as response:
        assert [j["job_id"] for j in (await response.json())["jobs"]] == [job["job_id"]]
    await end_job(http, proxy.url, job["job_id"])
    for _ in range(100):
        status, _ = await job_document(http, proxy.url, job["job_id"])
        if status == 404:
            break
        await asyncio.sleep(0.01)
    assert status == 404


async def test_ended_jobs_kept_are_bounded(http: aiohttp.ClientSession, make_proxy: ProxyFactory) -> None:
    """However long the retention, at most 4 x --max-jobs ended jobs are kept (oldest go)."""
    proxy = await make_proxy(max_jobs=1, job_retention=3600)
    started = []
    for _ in range(7):
        job = await start_job(http, proxy.url, {"command": ["true"]})
        started.append(job["job_id"])
        await JobReader(http, proxy.url, job["job_id"]).to_end()
    async with http.get(f"{proxy.url}/jobs") as response:
        kept = [j["job_id"] for j in (await response.json())["jobs"]]
    assert kept == started[-4:]


async def test_openapi_states_every_job_route_and_shape(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """Every jobs route and method of the app is in /openapi.json with its statuses; a real job
    document and a real read match the documented schemas; a job's timeout is bounded by
    --max-job-duration there as in the server."""
    proxy = await make_proxy(max_job_duration=99)
    async with http.get(f"{proxy.url}/openapi.json") as response:
        document = await response.json()
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in proxy.server.exec_app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/jobs")
        and route.method != "HEAD"
    }
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == {r for r in documented if r[0].startswith("/jobs")}
    assert {"201", "422", "429", "503"} <= set(document["paths"]["/jobs"]["post"]["responses"])
    assert "404" in document["paths"]["/jobs/{job_id}"]["delete"]["responses"]
    schemas = document["components"]["schemas"]
    assert schemas["JobRequest"]["properties"]["timeout"]["anyOf"][0]["maximum"] == 99

    def validator(name: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        )

    job = await start_job(http, proxy.url, {"command": ["sh", "-c", "printf 'a\\377'; echo b >&2"]})
    ended = await wait_ended(http, proxy.url, job["job_id"])
    for shown in (job, ended):
        assert not list(validator("JobDocument").iter_errors(shown)), shown
    for event in await read_output(http, proxy.url, job["job_id"], stdout=1):
        assert not list(validator("JobEvent").iter_errors(event)), event


async def test_one_log_line_per_job(
    http: aiohttp.ClientSession, proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Each job logs one `job finished` line with its id, outcome, digest and bytes; the argv
    itself only at debug level."""
    caplog.set_level(logging.INFO, logger="session_proxy.jobs.job")
    job = await start_job(http, proxy.url, {"command": ["sh", "-c", "echo s3cret-argument"]})
    await wait_ended(http, proxy.url, job["job_id"])
    lines = [r for r in caplog.records if r.getMessage() == "job finished"]
    assert len(lines) == 1
    line = lines[0].__dict__
    assert (line["job_id"], line["outcome"], line["exit_code"]) == (job["job_id"], "exited", 0)
    assert (line["stdout_bytes"], line["dropped_bytes"]) == (len("s3cret-argument\n"), 0)
    assert line["argv_sha256"].startswith("sha256:")
    assert "s3cret" not in caplog.text
