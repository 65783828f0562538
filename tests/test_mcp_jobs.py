"""Background jobs over MCP: an agent starts `python -m http.server` as a job, fetches from it
with `exec`, reads the server's log lines by offset, and ends it; nothing is left running."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import RunningProxy, survivors
from .jobs_api import fetch_command, http_server
from .mcp_client import TRANSPORTS, connect, text_of

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_agent_runs_a_server_as_a_job(
    proxy: RunningProxy, transport: str, tmp_path: Path, marker: str
) -> None:
    """exec with background answers with the job id, first output and offsets; job_output reads
    on from the offsets (with grep, only the request lines); job_end ends the whole group."""
    async with connect(transport, proxy.url, tmp_path) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert "background" in tools["exec"].input_schema["properties"]
        assert tools["job_output"].annotations.read_only_hint is True
        started = await session.call_tool("exec", {"argv": http_server(marker), "background": True})
        assert not started.is_error, text_of(started)
        job = started.structured_content
        assert job is not None
        assert f"started background job {job['job_id']}" in text_of(started)
        offsets = {"stdout_offset": job["stdout_offset"], "stderr_offset": job["stderr_offset"]}
        text = text_of(started)
        while not (port := re.search(r"Serving HTTP on 127\.0\.0\.1 port (\d+)", text)):
            read = await session.call_tool("job_output", {"job_id": job["job_id"], **offsets, "wait": 10})
            text = text_of(read)
            assert read.structured_content is not None
            offsets = {k: read.structured_content[k] for k in offsets}
        for path in ("/?one", "/?two"):
            fetched = await session.call_tool(
                "exec", {"argv": fetch_command(f"http://127.0.0.1:{port.group(1)}{path}")}
            )
            assert text_of(fetched).endswith("200\nexit code: 0"), text_of(fetched)
        logged = ""
        while "/?two" not in logged:
            read = await session.call_tool(
                "job_output", {"job_id": job["job_id"], **offsets, "wait": 10, "grep": "GET /"}
            )
            assert not read.is_error, text_of(read)
            assert read.structured_content is not None
            logged += text_of(read)
            offsets = {k: read.structured_content[k] for k in offsets}
        assert '"GET /?one HTTP/1.1" 200' in logged
        everything = {"stdout_offset": 0, "stderr_offset": 0}
        grepped = text_of(
            await session.call_tool("job_output", {"job_id": job["job_id"], **everything, "grep": "two"})
        )
        assert '"GET /?two HTTP/1.1" 200' in grepped
        assert "Serving HTTP" not in grepped  # grep kept only the matching line
        assert "?one" not in grepped
        again = await session.call_tool("job_output", {"job_id": job["job_id"], **offsets})
        assert "(no new output)" in text_of(again)
        ended = await session.call_tool("job_end", {"job_id": job["job_id"]})
        assert not ended.is_error
        assert "(killed)" in text_of(ended)
        assert await survivors(marker, within=5) == []
        unknown = await session.call_tool("job_output", {"job_id": "nope"})
        assert unknown.is_error
        assert "no job" in text_of(unknown)
