"""HTTP routes of background jobs: start, list, show, read output, end.

``POST /jobs`` takes the body of ``POST /exec`` with every check and the same admission (the
rate limit), but its own cap (``--max-jobs``, 429 ``job_limit``) and its own largest
``timeout`` (``--max-job-duration``, also the default).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Final

from aiohttp import web

from ..errors import InvalidRequest
from ..handlers import _check_content, _check_streamable, _read_body, exec_spec, parse_exec_request
from ..keys import ADMISSION, JOBS, SETTINGS, SUPERVISOR
from ..ndjson import EventStream
from ..streaming import shutting_down
from .models import JOB_STREAMS
from .reading import read_job, read_to_end

MAX_WAIT: Final = 300.0
QUERY_NAMES: Final = frozenset({"stdout", "stderr", "wait", "follow", "limit"})
WHOLE_NUMBER: Final = re.compile(r"[0-9]{1,18}")
FLAGS: Final = {"true": True, "1": True, "false": False, "0": False}


def _invalid(name: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"invalid query: {name}: {reason}", [{"field": name, "reason": reason}])


def _whole_number(query: Any, name: str, default: int, maximum: int | None = None) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not WHOLE_NUMBER.fullmatch(text):
        raise _invalid(name, "must be a whole number of bytes (0 or more)")
    value = int(text)
    if maximum is not None and value > maximum:
        raise _invalid(name, f"{value} is past the end of the stream ({maximum} bytes so far)")
    return value


def _wait_seconds(query: Any) -> float:
    text = query.get("wait", "0")
    try:
        value = float(text)
    except ValueError:
        raise _invalid("wait", f"must be seconds from 0 to {MAX_WAIT:g}") from None
    if not 0 <= value <= MAX_WAIT:  # also refuses nan
        raise _invalid("wait", f"must be seconds from 0 to {MAX_WAIT:g}")
    return value


async def post_job(request: web.Request) -> web.Response:
    arrived = asyncio.get_running_loop().time()
    app = request.app
    settings = app[SETTINGS]
    if app[SUPERVISOR].draining:
        raise shutting_down()
    _check_content(request)
    body = await _read_body(request, settings)
    job_request = parse_exec_request(body, settings, max_timeout=settings.max_job_duration)
    jobs = app[JOBS]
    jobs.check_room()
    await app[ADMISSION].take_rate_token()
    job = await jobs.start(exec_spec(job_request, default_timeout=settings.max_job_duration, arrived=arrived))
    return web.json_response(
        job.document().model_dump(mode="json"),
        status=201,
        headers={"Location": f"/jobs/{job.job_id}"},
    )


async def get_jobs(request: web.Request) -> web.Response:
    documents = [job.document().model_dump(mode="json") for job in request.app[JOBS].jobs()]
    return web.json_response({"jobs": documents})


async def get_job(request: web.Request) -> web.Response:
    job = request.app[JOBS].get(request.match_info["job_id"])
    return web.json_response(job.document().model_dump(mode="json"))


async def delete_job(request: web.Request) -> web.Response:
    """End the job (TERM, grace, KILL: the whole group); answers once it is gone."""
    job = await request.app[JOBS].end(request.match_info["job_id"])
    return web.json_response(job.document().model_dump(mode="json"))


async def get_job_output(request: web.Request) -> web.StreamResponse:
    """Output from the given offsets: what is there now, or after waiting, or until the end."""
    job = request.app[JOBS].get(request.match_info["job_id"])
    query = request.query
    unknown = sorted(set(query) - QUERY_NAMES)
    if unknown:
        raise _invalid(unknown[0][:40], f"unknown parameter; use {', '.join(sorted(QUERY_NAMES))}")
    offsets = {s: _whole_number(query, s, 0, maximum=job.rings[s].end) for s in JOB_STREAMS}
    wait = _wait_seconds(query)
    follow_text = query.get("follow", "false")
    if follow_text not in FLAGS:
        raise _invalid("follow", "must be true or false")
    follow = FLAGS[follow_text]
    limit = _whole_number(query, "limit", request.app[SETTINGS].job_output_bytes) or 1
    _check_streamable(request)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait
    events = EventStream(request, job.job_id)
    while True:
        found = read_job(job, offsets, limit)
        for event in found:
            await events.write(event)
        done = read_to_end(job, offsets)
        if done:
            assert job.exit is not None
            exit_event = job.exit.model_dump(mode="json")
            if exit_event["message"] is None:
                del exit_event["message"]
            await events.write(exit_event)
            break
        if not follow and (found or loop.time() >= give_up):
            break
        await job.wait_for_change(None if follow else give_up - loop.time())
    await events.write({"type": "cursor", **offsets, "done": done})
    await events.end()
    return events.response


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/jobs", post_job)
    router.add_get("/jobs", get_jobs)
    router.add_get("/jobs/{job_id}", get_job)
    router.add_delete("/jobs/{job_id}", delete_job)
    router.add_get("/jobs/{job_id}/output", get_job_output)
