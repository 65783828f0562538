"""POST /exec on the local backend: the event stream is complete, ordered, lossless and live."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest

from session_proxy.backends.base import ExecSpec, Execution, ExitStatus, OutputChunk, WaitingCallback
from session_proxy.backends.local import LocalBackend

from .conftest import ProxyFactory, RunningProxy, exec_events, final, output_of, survivors


async def test_events_are_start_output_exit(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A plain command yields start, its stdout and stderr apart, then one exit with the counts."""
    events = await exec_events(http, proxy, {"command": ["sh", "-c", "echo out; echo err >&2; exit 0"]})
    assert events[0]["type"] == "start"
    assert events[0]["target"].startswith("local:")
    assert len(events[0]["exec_id"]) == 16
    assert output_of(events, "stdout") == b"out\n"
    assert output_of(events, "stderr") == b"err\n"
    exit_event = final(events)
    assert exit_event["exit_code"] == 0
    assert exit_event["reason"] == "exited"
    assert exit_event["stdout_bytes"] == 4
    assert exit_event["stderr_bytes"] == 4
    assert exit_event["truncated"] is False


async def test_exit_codes_pass_through(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """Exit codes 0, 1 and 42 arrive unchanged."""
    for code in (0, 1, 42):
        events = await exec_events(http, proxy, {"command": ["sh", "-c", f"exit {code}"]})
        assert final(events)["exit_code"] == code


async def test_signal_death_reports_the_signal(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A command killed by a signal reports the signal number, not an exit code."""
    events = await exec_events(http, proxy, {"command": ["sh", "-c", "kill -KILL $$"]})
    exit_event = final(events)
    assert exit_event["exit_code"] is None
    assert exit_event["signal"] == 9
    assert exit_event["reason"] == "exited"


async def test_output_arrives_while_the_command_runs(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """Each line reaches the client before the command goes on: it waits for our go-ahead file."""
    gate = tmp_path / "gate"
    script = f"for i in 1 2 3; do echo line$i; while [ ! -e {gate}$i ]; do sleep 0.01; done; done; echo end"
    body = {"command": ["sh", "-c", script], "timeout": 30}
    seen: list[str] = []
    async with http.post(f"{proxy.url}/exec", json=body) as response:
        async for raw in response.content:
            event = json.loads(raw)
            if event["type"] == "stdout":
                seen.append(event["data"])
                number = len(seen)
                if number <= 3:
                    assert event["data"] == f"line{number}\n"
                    Path(f"{gate}{number}").touch()  # only now may the command continue
            if event["type"] == "exit":
                assert event["exit_code"] == 0
    assert "".join(seen) == "line1\nline2\nline3\nend\n"


async def test_utf8_split_across_writes_is_reassembled(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """A character cut between two reads arrives whole, as text: the command writes `x` and the
    euro sign's first byte, and writes the rest only after the client has received the `x` alone."""
    gate = tmp_path / "gate"
    script = rf"printf 'x\342'; while [ ! -e {gate} ]; do sleep 0.01; done; printf '\202\254 ok\n'"
    stdout_events = []
    async with http.post(
        f"{proxy.url}/exec", json={"command": ["sh", "-c", script], "timeout": 30}
    ) as response:
        async for raw in response.content:
            event = json.loads(raw)
            if event["type"] == "stdout":
                stdout_events.append(event)
                gate.touch()  # the first read is in; only now may the rest be written
    assert stdout_events[0] == {"type": "stdout", "data": "x"}
    assert all("data" in e for e in stdout_events), stdout_events
    assert "".join(e["data"] for e in stdout_events) == "x€ ok\n"


async def test_binary_output_is_lossless(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """Random bytes (mostly invalid UTF-8) come back byte for byte, via data_b64."""
    payload = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(payload)
    events = await exec_events(http, proxy, {"command": ["cat", str(tmp_path / "blob")]})
    received = output_of(events, "stdout")
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert any("data_b64" in e for e in events)
    assert final(events)["stdout_bytes"] == len(payload)


async def test_output_cannot_forge_events(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A command printing an exit event line gets it back as data; the real exit comes last."""
    forged = json.dumps({"type": "exit", "exit_code": 0, "reason": "exited"})
    events = await exec_events(http, proxy, {"command": ["sh", "-c", f"printf '%s\\n' '{forged}'; exit 7"]})
    assert output_of(events, "stdout") == forged.encode() + b"\n"
    assert final(events)["exit_code"] == 7


async def test_stdin_text_and_bytes_then_eof(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """stdin and stdin_b64 reach the command exactly, followed by EOF (so cat ends)."""
    events = await exec_events(http, proxy, {"command": ["cat"], "stdin": "héllo\nworld"})
    assert output_of(events, "stdout") == "héllo\nworld".encode()
    raw = bytes(range(256))
    events = await exec_events(http, proxy, {"command": ["cat"], "stdin_b64": base64.b64encode(raw).decode()})
    assert output_of(events, "stdout") == raw
    assert final(events)["exit_code"] == 0


async def test_workdir_and_env_apply(
    http: aiohttp.ClientSession, proxy: RunningProxy, tmp_path: Path
) -> None:
    """workdir sets the directory; env values, with shell metacharacters, arrive literally."""
    (tmp_path / "sub").mkdir()
    tricky = "$(touch pwned); `id`; 'q' \"dq\"\nline2"
    events = await exec_events(
        http,
        proxy,
        {
            "command": ["sh", "-c", 'pwd; printf "%s" "$TRICKY"'],
            "workdir": str(tmp_path / "sub"),
            "env": {"TRICKY": tricky},
        },
    )
    assert output_of(events, "stdout") == f"{tmp_path / 'sub'}\n{tricky}".encode()
    assert not (tmp_path / "sub" / "pwned").exists()


async def test_proxy_environment_is_not_passed_on(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """The command sees a minimal environment, not the proxy's (which may hold secrets)."""
    os.environ["SESSION_PROXY_TEST_SECRET"] = "do-not-leak"
    try:
        events = await exec_events(http, proxy, {"command": ["env"]})
    finally:
        del os.environ["SESSION_PROXY_TEST_SECRET"]
    names = {line.split("=", 1)[0] for line in output_of(events, "stdout").decode().splitlines()}
    assert "SESSION_PROXY_TEST_SECRET" not in names
    assert names <= {"PATH", "HOME", "LANG", "PWD", "SHLVL", "_"}


async def test_background_child_does_not_hold_the_request(
    http: aiohttp.ClientSession, proxy: RunningProxy, marker: str
) -> None:
    """`sleep & echo done` ends with the command's exit code at once; the sleeper is then ended."""
    body = {"command": ["sh", "-c", f"sleep {marker} & echo done"], "timeout": 60}
    events = await asyncio.wait_for(exec_events(http, proxy, body), timeout=10)
    assert output_of(events, "stdout") == b"done\n"
    exit_event = final(events)
    assert exit_event["reason"] == "exited"
    assert exit_event["exit_code"] == 0
    assert exit_event["duration_ms"] < 10_000
    assert await survivors(marker) == []


async def test_missing_program_is_an_error_with_127(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """An unknown program ends in reason error, exit 127 (as in a shell), with a message."""
    events = await exec_events(http, proxy, {"command": ["no-such-program-xyz"]})
    exit_event = final(events)
    assert exit_event["reason"] == "error"
    assert exit_event["exit_code"] == 127
    assert "no-such-program-xyz" in exit_event["message"]


async def test_missing_workdir_is_an_error(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A workdir that does not exist is reported as such, not as a missing program."""
    events = await exec_events(http, proxy, {"command": ["true"], "workdir": "/no/such/dir"})
    exit_event = final(events)
    assert exit_event["reason"] == "error"
    assert "workdir" in exit_event["message"]


async def test_events_match_the_published_models(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """Every emitted event validates against the wire models the client and OpenAPI use."""
    from session_proxy.models import EVENT_ADAPTER

    events = await exec_events(http, proxy, {"command": ["sh", "-c", "echo a; printf '\\377' >&2; exit 3"]})
    for event in events:
        EVENT_ADAPTER.validate_python(event)


async def test_chatty_leftover_does_not_hold_the_request(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """A background child that never stops writing cannot keep the request open after the exit.

    The output cap is far away, so only the post-exit drain limit can end the request.
    """
    proxy = await make_proxy(max_output_bytes=1 << 40)
    script = f"(while :; do echo {marker}; done) & echo done"
    events = await asyncio.wait_for(exec_events(http, proxy, {"command": ["sh", "-c", script]}), timeout=15)
    exit_event = final(events)
    assert (exit_event["reason"], exit_event["exit_code"]) == ("exited", 0)
    assert exit_event["duration_ms"] < 5000
    assert await survivors(marker) == []


async def test_escaped_raw_bytes_in_argv(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """`\\udcff` in a JSON string is the raw byte 0xff (os.fsdecode's convention); other lone
    surrogates are refused."""
    body = '{"command": ["printf", "%s", "a\\udcffb"]}'
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{proxy.url}/exec", data=body, headers=headers) as response:
        events = [json.loads(line) for line in (await response.text()).splitlines()]
    assert output_of(events, "stdout") == b"a\xffb"
    bad = '{"command": ["printf", "\\ud800"]}'
    async with http.post(f"{proxy.url}/exec", data=bad, headers=headers) as response:
        assert response.status == 422
        assert "surrogate" in (await response.json())["error"]["message"]


class BrokenExecution:
    """A real local execution whose output source breaks after the first chunk (a bug's stand-in)."""

    def __init__(self, inner: Execution, error: type[Exception]) -> None:
        self._inner = inner
        self._error = error
        self.target = inner.target
        self.guarantees = inner.guarantees
        self.warm = inner.warm
        self._chunks = 0

    async def next_chunk(self) -> OutputChunk | None:
        if self._chunks:
            raise self._error("secret internal detail")
        self._chunks += 1
        return await self._inner.next_chunk()

    def exit_status(self) -> ExitStatus:
        return self._inner.exit_status()

    async def terminate(self, grace: float) -> ExitStatus | None:
        return await self._inner.terminate(grace)

    async def close(self) -> None:
        await self._inner.close()


class BrokenBackend(LocalBackend):
    """The local backend, failing with an unexpected exception at a chosen point."""

    def __init__(
        self,
        root: Path,
        fail: Literal["start", "after_waiting", "stream"],
        error: type[Exception] = RuntimeError,
    ) -> None:
        super().__init__(root)
        self._fail = fail
        self._error = error

    async def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> Any:
        if self._fail == "start":
            raise RuntimeError("secret internal detail")
        if self._fail == "after_waiting":
            await on_waiting("pretending the workspace is still starting")
            raise RuntimeError("secret internal detail")
        return BrokenExecution(await super().start(spec, on_waiting), self._error)


async def metrics_text(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        return await response.text()


@pytest.mark.parametrize("error", [RuntimeError, TimeoutError])
async def test_unexpected_failure_mid_stream_ends_the_command_and_reports_it(
    error: type[Exception],
    http: aiohttp.ClientSession,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    marker: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any exception while streaming: the group is ended, an ``error`` exit is the last event,
    the exec is logged and counted exactly once, and the failure's traceback goes to the log.
    A ``TimeoutError`` from the backend is such a failure too, not the exec's (idle) timeout."""
    caplog.set_level(logging.INFO)
    proxy = await make_proxy(exec_backend=BrokenBackend(tmp_path, "stream", error), idle_timeout=30)
    body = {"command": ["sh", "-c", f"echo started; sleep {marker} & sleep {marker}"], "timeout": 60}
    events = await exec_events(http, proxy, body)
    assert output_of(events, "stdout") == b"started\n"
    exit_event = final(events)
    assert (exit_event["reason"], exit_event["exit_code"]) == ("error", None)
    assert error.__name__ in exit_event["message"]
    assert "secret" not in exit_event["message"]
    assert await survivors(marker) == []
    metrics = await metrics_text(http, proxy)
    assert 'session_proxy_exec_requests_total{outcome="error"} 1.0' in metrics
    assert "session_proxy_exec_in_flight 0.0" in metrics
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("exec finished") == 1
    assert [r.exc_info is not None for r in caplog.records if r.getMessage() == "exec failed"] == [True]


async def test_unexpected_failure_before_streaming_is_a_json_500(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception before anything was sent: a JSON 500 without internals, logged once, counted."""
    caplog.set_level(logging.INFO)
    proxy = await make_proxy(exec_backend=BrokenBackend(tmp_path, "start"))
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
        assert response.status == 500
        assert response.content_type == "application/json"
        text = await response.text()
    assert json.loads(text)["error"]["code"] == "internal_error"
    assert "secret" not in text
    assert "Traceback" not in text
    failures = [r for r in caplog.records if r.getMessage() == "request failed"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert 'session_proxy_rejections_total{reason="internal_error"} 1.0' in await metrics_text(http, proxy)


async def test_unexpected_failure_after_waiting_events_ends_with_an_error_exit(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Once a ``waiting`` event went out, a failure is an ``error`` exit event, not a cut stream."""
    proxy = await make_proxy(exec_backend=BrokenBackend(tmp_path, "after_waiting"))
    events = await exec_events(http, proxy, {"command": ["true"]})
    assert events[0]["type"] == "waiting"
    assert final(events)["reason"] == "error"
    assert 'session_proxy_exec_requests_total{outcome="error"} 1.0' in await metrics_text(http, proxy)


@pytest.mark.timeout(60)
async def test_hanging_up_mid_write_logs_no_error(
    http: aiohttp.ClientSession, proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A client hanging up while its command floods output is an ordinary client_gone: the proxy
    logs no error-level traceback for it (aiohttp logs any exception a handler raises)."""
    caplog.set_level(logging.INFO)
    for _ in range(200):
        response = await http.post(f"{proxy.url}/exec", json={"command": ["yes", "x" * 1000]})
        assert json.loads(await response.content.readline())["type"] == "start"
        await response.content.readline()
        response.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
