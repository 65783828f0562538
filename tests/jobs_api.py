"""Talking to the jobs API in tests: start, read (once, waiting, following), end."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import time
from typing import Any

import aiohttp

HTTP_SERVER_SCRIPT = "import http.server,sys; sys.argv[1:]=['0','--bind','127.0.0.1']; " + (
    "import runpy; runpy.run_module('http.server', run_name='__main__')"
)
SERVING = re.compile(rb"Serving HTTP on 127\.0\.0\.1 port (\d+)")


def http_server(marker: str) -> list[str]:
    """``python -m http.server`` on a free port, with a sleeper carrying ``marker`` in its group."""
    return ["sh", "-c", f'sleep {marker} & exec "$0" -u -c "$1"', sys.executable, HTTP_SERVER_SCRIPT]


def fetch_command(url: str) -> list[str]:
    """An exec that fetches ``url`` and prints the HTTP status."""
    script = "import sys,urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)"
    return [sys.executable, "-c", script, url]


async def start_job(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{url}/jobs", json=body) as response:
        document: dict[str, Any] = await response.json()
        assert response.status == 201, document
        assert response.headers["Location"] == f"/jobs/{document['job_id']}"
    return document


async def read_output(
    http: aiohttp.ClientSession, url: str, job_id: str, **query: Any
) -> list[dict[str, Any]]:
    """One GET of the job's output; the events, after checking the last is the one cursor."""
    params = {
        name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in query.items()
    }
    async with http.get(f"{url}/jobs/{job_id}/output", params=params) as response:
        text = await response.text()
        assert response.status == 200, text
        assert response.headers["Content-Type"] == "application/x-ndjson"
    events = [json.loads(line) for line in text.splitlines()]
    assert [e["type"] for e in events].count("cursor") == 1
    assert events[-1]["type"] == "cursor", events
    return events


def payload(event: dict[str, Any]) -> bytes:
    if "data_b64" in event:
        return base64.b64decode(event["data_b64"])
    return str(event["data"]).encode()


class JobReader:
    """Reads a job's output on from where it stopped, checking every offset on the way."""

    def __init__(self, http: aiohttp.ClientSession, url: str, job_id: str) -> None:
        self.http, self.url, self.job_id = http, url, job_id
        self.offsets = {"stdout": 0, "stderr": 0}
        self.output = {"stdout": b"", "stderr": b""}
        self.lost = {"stdout": 0, "stderr": 0}
        self.exit: dict[str, Any] | None = None
        self.done = False

    async def read(self, **query: Any) -> list[dict[str, Any]]:
        events = await read_output(self.http, self.url, self.job_id, **self.offsets, **query)
        for event in events[:-1]:
            if event["type"] == "lost":
                assert event["offset"] == self.offsets[event["stream"]], event
                self.lost[event["stream"]] += event["bytes"]
                self.offsets[event["stream"]] += event["bytes"]
            elif event["type"] in ("stdout", "stderr"):
                assert event["offset"] == self.offsets[event["type"]], (event, self.offsets)
                self.output[event["type"]] += payload(event)
                self.offsets[event["type"]] += len(payload(event))
            else:
                assert event["type"] == "exit", event
                assert self.exit is None, event
                self.exit = event
        cursor = events[-1]
        assert {s: cursor[s] for s in self.offsets} == self.offsets, (cursor, self.offsets)
        self.done = cursor["done"]
        assert self.done is (self.exit is not None)
        return events

    async def until(
        self, pattern: re.Pattern[bytes], stream: str = "stdout", within: float = 20
    ) -> re.Match[bytes]:
        """Read (each read waiting for more) until ``pattern`` appears in the stream."""
        deadline = time.monotonic() + within
        while not (match := pattern.search(self.output[stream])):
            assert not self.done, self.output
            assert time.monotonic() < deadline, f"{pattern.pattern!r} never came: {self.output}"
            await self.read(wait=2)
        return match

    async def to_end(self, within: float = 30, **query: Any) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while not self.done:
            assert time.monotonic() < deadline, self.output
            await self.read(wait=2, **query)
        assert self.exit is not None
        return self.exit


async def end_job(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    async with http.delete(f"{url}/jobs/{job_id}") as response:
        document: dict[str, Any] = await response.json()
        assert response.status == 200, document
    assert document["state"] == "ended", document
    return document


async def job_document(http: aiohttp.ClientSession, url: str, job_id: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{url}/jobs/{job_id}") as response:
        return response.status, await response.json()


async def wait_ended(
    http: aiohttp.ClientSession, url: str, job_id: str, within: float = 30
) -> dict[str, Any]:
    """Poll the job's document (reading no output) until the job has ended."""
    deadline = time.monotonic() + within
    while True:
        status, document = await job_document(http, url, job_id)
        assert status == 200, document
        if document["state"] == "ended":
            return document
        assert time.monotonic() < deadline, document
        await asyncio.sleep(0.02)
