"""Execs through the real proxy and the Kubernetes API test server, on both API server modes."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest

from .conftest import (
    KubeSetup,
    ProxyFactory,
    check_path,
    final,
    fresh_setup,
    image_without_setsid,
    kube_exec,
    kube_proxy,
    output_of,
    survivors,
    wait_for_pool,
)
from .kube_api_server import Fault


async def test_streams_and_exit_code(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """stdout and stderr stay apart, markers are stripped, and the exit code is the command's."""
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", "echo out; echo err >&2; exit 42"]})
    assert events[0]["type"] == "start"
    assert events[0]["target"] == "default/ws-1/workspace"
    assert events[0]["guarantees"] == {
        "workdir": True, "env": True, "stdin": True, "kill": True, "runner": kube_setup.runner
    }  # fmt: skip
    assert output_of(events, "stdout") == b"out\n"
    assert output_of(events, "stderr") == b"err\n"
    assert final(events)["exit_code"] == 42
    assert final(events)["reason"] == "exited"


# Cold only: the fault applies to execs opened from now on, and a warm pool opened its earlier.
@pytest.mark.parametrize("exec_path", ["cold"])
async def test_stdout_lagging_behind_the_exit_marker_is_not_lost(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """stdout that reaches the proxy after the exit marker (stderr) is still delivered whole: the
    exit counts once the wrapper's end-of-stdout marker has arrived, not after a quiet spell."""
    kube_setup.api.faults.append(Fault(path="/exec", stdout_lag=0.3, times=-1))
    script = "printf 'one\\n'; sleep 0.1; printf 'two\\n'; echo err >&2"
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", script]})
    assert output_of(events, "stdout") == b"one\ntwo\n"
    assert output_of(events, "stderr") == b"err\n"
    assert (final(events)["reason"], final(events)["exit_code"]) == ("exited", 0)
    assert final(events)["stdout_bytes"] == 8


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 1", 1), ("exit 127", 127)])
async def test_exit_codes(http: aiohttp.ClientSession, kube_setup: KubeSetup, script: str, code: int) -> None:
    """Exit codes 0, 1 and 127 pass through unchanged."""
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", script]})
    assert final(events)["exit_code"] == code


async def test_missing_program_is_an_error_with_127(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """A program missing from the image ends in reason error, exit 127, with a message naming
    it, as on the local backend."""
    events = await kube_exec(http, kube_setup, {"command": ["no-such-program-xyz"]})
    exit_event = final(events)
    assert (exit_event["reason"], exit_event["exit_code"]) == ("error", 127)
    assert "no-such-program-xyz" in exit_event["message"]


async def test_signal_death_is_128_plus_n(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """Through Kubernetes a signal death shows as the shell's 128+N exit code."""
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", "kill -KILL $$"]})
    assert final(events)["exit_code"] == 128 + 9


async def test_output_arrives_while_the_command_runs(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """Each line reaches the client before the command goes on (it waits for our go-ahead)."""
    gate = kube_setup.pod.root / "gate"
    script = f"for i in 1 2 3; do echo line$i; while [ ! -e {gate}$i ]; do sleep 0.01; done; done"
    seen = []
    if kube_setup.path == "warm":
        await wait_for_pool(kube_setup.proxy, 1)
    async with http.post(f"{kube_setup.proxy.url}/exec", json={"command": ["sh", "-c", script]}) as response:
        async for raw in response.content:
            event = json.loads(raw)
            if event["type"] == "start":
                check_path(kube_setup, [event])
            if event["type"] == "stdout":
                seen.append(event["data"])
                Path(f"{gate}{len(seen)}").touch()
    assert seen == ["line1\n", "line2\n", "line3\n"]


async def test_stdin_then_eof(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """stdin bytes reach the command exactly, then EOF, on v5 and v4 alike (cat ends)."""
    data = bytes(range(256)) * 300
    body = {"command": ["sh", "-c", "cat; echo; echo done"], "stdin_b64": base64.b64encode(data).decode()}
    events = await kube_exec(http, kube_setup, body)
    assert output_of(events, "stdout") == data + b"\ndone\n"
    assert final(events)["exit_code"] == 0


async def test_user_values_arrive_literally_and_never_in_the_url(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """argv, env and workdir with shell syntax and non-UTF-8 bytes arrive as given; the URL is constant."""
    tricky = "a b; echo INJECTED $(touch pwned) `touch pwned2` 'q' \"dq\"\nline2 \udcff"
    workdir = kube_setup.pod.root / "dir with space; $(x)"
    workdir.mkdir()
    body = {
        "command": ["sh", "-c", 'printf "%s|" "$0" "$1" "$PWD" "$TRICKY"', tricky, "second arg"],
        "workdir": str(workdir),
        "env": {"TRICKY": tricky},
    }
    events = await kube_exec(http, kube_setup, body)
    expected = b"|".join(
        part.encode("utf-8", "surrogateescape") for part in (tricky, "second arg", str(workdir), tricky)
    )
    assert output_of(events, "stdout") == expected + b"|"
    assert not list(kube_setup.pod.root.rglob("pwned*"))
    requests = kube_setup.api.exec_requests()
    assert requests
    for request in requests:
        decoded = unquote(request.raw_path)
        for value in ("INJECTED", "second arg", "TRICKY", "dir with space", '"%s|"'):
            assert value not in decoded
            assert value not in str(request.query)


async def test_forged_markers_do_not_end_the_request(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """A command printing marker-like bytes gets them back verbatim; the real exit comes after."""
    fake = "\x1eSP" + "0" * 32 + ":exit:0\x1e"
    script = f"printf '%s' '{fake}' >&2; printf 'after' >&2; exit 5"
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", script]})
    assert output_of(events, "stderr") == fake.encode() + b"after"
    assert final(events)["exit_code"] == 5


async def test_background_child_does_not_hold_the_request(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """`sleep & echo done` ends at once with exit 0, and the sleeper is ended afterwards."""
    body = {"command": ["sh", "-c", f"sleep {marker} & echo done"], "timeout": 60}
    events = await asyncio.wait_for(kube_exec(http, kube_setup, body), timeout=15)
    assert output_of(events, "stdout") == b"done\n"
    assert final(events)["exit_code"] == 0
    assert final(events)["duration_ms"] < 5000
    assert await survivors(marker) == []


@pytest.mark.parametrize("shell", ["dash", "bash", "busybox sh"])
async def test_wrapper_works_with_each_shell(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, shell: str, marker: str,
    make_proxy: ProxyFactory, tmp_path: Path,
) -> None:  # fmt: skip
    """The wrapper runs under dash, bash and busybox sh: env, workdir, stdin, exit code, kill."""
    kube_setup.pod.shell = shell
    kube_setup = await fresh_setup(http, kube_setup, make_proxy, tmp_path)
    body = {
        "command": ["sh", "-c", 'printf "%s:%s:" "$V" "$PWD"; cat; exit 3'],
        "env": {"V": "x y"}, "workdir": "/", "stdin": "in",
    }  # fmt: skip
    events = await kube_exec(http, kube_setup, body)
    assert output_of(events, "stdout") == b"x y:/:in"
    assert final(events)["exit_code"] == 3
    events = await kube_exec(
        http, kube_setup, {"command": ["sh", "-c", f"sleep {marker} & sleep {marker}"], "timeout": 1}
    )
    assert final(events)["reason"] == "timeout"
    assert await survivors(marker) == []


async def test_workdir_that_does_not_exist(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """A missing workdir ends in reason error with a message, not a shell's confusing exit."""
    events = await kube_exec(http, kube_setup, {"command": ["true"], "workdir": "/no/such/dir"})
    assert final(events)["reason"] == "error"
    assert "workdir" in final(events)["message"]


@pytest.mark.parametrize("runner", ["shell"])  # a proxy of its own: the pod has neither
async def test_image_without_shell_runs_bare_argv(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """No /bin/sh in the image: plain argv still runs, the start event says no guarantees hold,
    and workdir/env/stdin are refused with 422; with the pool on, no warm exec is ever opened."""
    kube_setup.pod.shell = "/nonexistent/sh"
    opened_before = _warm_opens(kube_setup)
    proxy = await kube_proxy(kube_setup.api, make_proxy, tmp_path, warm_execs=2)
    kube_setup = KubeSetup(kube_setup.api, proxy, kube_setup.pod, "cold", "none")
    for _ in range(2):
        events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", "echo bare; exit 4"]})
    assert _warm_opens(kube_setup) == opened_before
    assert events[0]["guarantees"] == {
        "workdir": False, "env": False, "stdin": False, "kill": False, "runner": "none"
    }  # fmt: skip
    assert output_of(events, "stdout") == b"bare\n"
    assert final(events)["exit_code"] == 4
    async with http.post(
        f"{kube_setup.proxy.url}/exec", json={"command": ["true"], "workdir": "/tmp", "stdin": "x"}
    ) as response:
        assert response.status == 422
        fields = {f["field"] for f in (await response.json())["error"]["fields"]}
        assert fields == {"workdir", "stdin"}


async def test_large_output_is_complete(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """12 MB of output arrives complete and in order through the WebSocket."""
    size = 12 * 1024 * 1024
    events = await kube_exec(
        http, kube_setup, {"command": ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' 'z'"]}
    )
    received = output_of(events, "stdout")
    assert len(received) == size, (len(received), final(events))
    assert received == b"z" * size


async def test_status_and_logs(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """/status describes the workspace pod; /logs returns the container's log tail."""
    kube_setup.pod.log_lines = [f"line {i}" for i in range(10)]
    async with http.get(f"{kube_setup.proxy.url}/status") as response:
        status = await response.json()
    assert status["backend"] == "kubernetes"
    assert status["ready"] is True
    pod = status["target"]["pods"][0]
    assert (pod["pod"], pod["phase"], pod["ready"], pod["restarts"]) == ("ws-1", "Running", True, 0)
    assert pod["image"] == "example.com/user/tools:1.0"
    async with http.get(f"{kube_setup.proxy.url}/logs?tail=3") as response:
        assert await response.text() == "line 7\nline 8\nline 9\n"
    async with http.get(f"{kube_setup.proxy.ops_url}/readyz") as response:
        assert response.status == 200


async def test_logs_are_bounded_in_bytes(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """/logs asks the API server for at most 1 MiB (limitBytes) and returns no more, however
    long the log's lines are."""
    kube_setup.pod.log_lines = ["x" * (3 * 1024 * 1024)]
    async with http.get(f"{kube_setup.proxy.url}/logs?tail=1") as response:
        assert response.status == 200
        text = await response.text()
    assert text == "x" * (1024 * 1024)
    log_requests = [r for r in kube_setup.api.requests if r.path.endswith("/log")]
    assert dict(log_requests[-1].query)["limitBytes"] == str(1024 * 1024)


async def test_each_exec_carries_a_distinctive_user_agent(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """The API server's audit log can join an exec to the proxy's log line by exec_id; a warm
    exec, opened before its request, says warm_exec=ID instead."""
    events = await kube_exec(http, kube_setup, {"command": ["true"]})
    agents = " ".join(r.headers.get("User-Agent", "") for r in kube_setup.api.exec_requests())
    if kube_setup.path == "cold":
        assert f"exec_id={events[0]['exec_id']}" in agents
        assert "warm_exec=" not in agents
    else:
        assert f"exec_id={events[0]['exec_id']}" not in agents
        assert "warm_exec=" in agents


async def test_chatty_leftover_does_not_hold_the_request(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """A background child that never stops writing cannot keep the request open after the exit.

    It writes every 10 ms, never quiet long enough for the drain's quiet cut, at a rate that
    cannot reach the output cap (a tight loop's rate depends on the machine: a fast one fills
    16 MiB within the drain budget and the exec ends as output_limit)."""
    script = f"(while :; do echo {marker}; sleep 0.01; done) & echo done"
    events = await asyncio.wait_for(
        kube_exec(http, kube_setup, {"command": ["sh", "-c", script]}), timeout=15
    )
    assert (final(events)["reason"], final(events)["exit_code"]) == ("exited", 0)
    assert await survivors(marker) == []


async def test_stderr_ending_like_a_marker_start_is_kept(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """Bytes held back because they could begin a marker reach the client byte for byte."""
    script = r"printf 'x\036' >&2; printf '\036SP' >&2; exit 2"
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", script]})
    assert output_of(events, "stderr") == b"x\x1e\x1eSP"
    assert final(events)["exit_code"] == 2


async def test_image_without_setsid_degrades_and_says_so(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, tmp_path: Path, marker: str, make_proxy: ProxyFactory
) -> None:
    """An image with a shell but no setsid still runs commands; under the shell wrapper the
    start event says kill is not guaranteed (the supervisor needs no setsid), and a timeout
    still ends the command itself."""
    kube_setup.pod.path = image_without_setsid(tmp_path)
    kube_setup = await fresh_setup(http, kube_setup, make_proxy, tmp_path)
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", "echo hi; exit 3"]})
    supervised = kube_setup.runner == "supervisor"
    assert events[0]["guarantees"] == {
        "workdir": True, "env": True, "stdin": True, "kill": supervised, "runner": kube_setup.runner
    }  # fmt: skip
    assert output_of(events, "stdout") == b"hi\n"
    assert final(events)["exit_code"] == 3
    events = await kube_exec(http, kube_setup, {"command": ["sleep", marker], "timeout": 1})
    assert final(events)["reason"] == "timeout"
    assert await survivors(marker) == []


def _warm_opens(setup: KubeSetup) -> int:
    return sum("warm_exec=" in r.headers.get("User-Agent", "") for r in setup.api.exec_requests())
