"""`--log-format`: one JSON object per line by default, `level logger: message key=value ...`
with `text`; either way one line per exec with the documented fields and never the argv."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

EXEC_FIELDS = {
    "exec_id", "target", "argv_sha256", "duration_ms", "exit_code", "signal",
    "stdout_bytes", "stderr_bytes", "outcome",
}  # fmt: skip
TEXT_LINE = re.compile(r"^(debug|info|warning|error|critical) +([\w.]+): (.+)$")
SECRET = "s3cret-argument-4711"


async def run_and_stop(tmp_path: Path, log_format: str) -> tuple[str, str]:
    """Start `serve` with this log format, run one exec, stop it; the exec id and the log."""
    log_path = tmp_path / "proxy.log"
    command = [
        sys.executable, "-m", "session_proxy", "serve", "--log-format", log_format,
        "--listen", "127.0.0.1:0", "--ops-listen", "", "--backend", "local", "--local-root", str(tmp_path),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stderr=log_file, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"http://127\.0\.0\.1:\d+", log_path.read_text())):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the proxy did not start"
            await asyncio.sleep(0.02)
        body = {"command": ["sh", "-c", "echo hi; exit 3", SECRET]}
        async with aiohttp.ClientSession() as http, http.post(f"{found[0]}/exec", json=body) as response:
            exec_id = json.loads(await response.content.readline())["exec_id"]
            await response.read()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return exec_id, log_path.read_text()


@pytest.mark.timeout(60)
async def test_text_format_is_one_readable_line_per_event(tmp_path: Path) -> None:
    """With `--log-format text` no line is JSON; each is `level logger: message` and the exec's
    line carries every documented field as key=value, the digest but not the argv."""
    exec_id, log = await run_and_stop(tmp_path, "text")
    lines = log.splitlines()
    assert lines
    for line in lines:
        assert TEXT_LINE.match(line), line
        assert not line.startswith("{"), line
    finished = [line for line in lines if f"exec_id={exec_id}" in line]
    assert len(finished) == 1, log
    level, logger, rest = TEXT_LINE.match(finished[0]).groups()  # type: ignore[union-attr]
    assert (level, logger) == ("info", "session_proxy.streaming")
    assert rest.startswith("exec finished ")
    fields = dict(re.findall(r"(\w+)=(\S*)", rest))
    assert set(fields) >= EXEC_FIELDS
    assert (fields["exit_code"], fields["outcome"], fields["stdout_bytes"]) == ("3", "exited", "3")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fields["argv_sha256"])
    assert SECRET not in log
    assert any(line.startswith("info") and ": listening " in line for line in lines)


@pytest.mark.timeout(60)
async def test_json_format_is_one_object_per_line(tmp_path: Path) -> None:
    """By default every line is a JSON object with time, level, logger and msg; the exec's line
    has every documented field, the digest but not the argv."""
    exec_id, log = await run_and_stop(tmp_path, "json")
    entries = [json.loads(line) for line in log.splitlines()]
    assert entries
    for entry in entries:
        assert {"time", "level", "logger", "msg"} <= set(entry), entry
    (finished,) = [e for e in entries if e.get("exec_id") == exec_id]
    assert finished["msg"] == "exec finished"
    assert set(finished) >= EXEC_FIELDS
    assert (finished["exit_code"], finished["outcome"], finished["stdout_bytes"]) == (3, "exited", 3)
    assert SECRET not in log
