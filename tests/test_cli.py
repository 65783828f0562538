"""`session-proxy exec`: byte-exact output on the right streams and meaningful exit codes."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from session_proxy.client import ExecClient, ProxyUnreachable
from session_proxy.exec_command import run_exec_command
from session_proxy.models import ExitEvent, OutputEvent

from .conftest import ProxyProcess, processes_with, survivors


@pytest.fixture
def served(spawn_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return spawn_proxy("--default-timeout", "30", "--max-concurrent", "4")


def cli(
    url: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "session_proxy", "exec", "--url", url, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_stdout_is_byte_exact_and_streams_are_separate(served: ProxyProcess, tmp_path: Path) -> None:
    """Binary stdout arrives byte for byte; stderr goes to stderr; the exit code passes through."""
    blob = os.urandom(200_000) + "€ text".encode()
    (tmp_path / "blob").write_bytes(blob)
    result = cli(served.url, "--", "sh", "-c", f"cat {tmp_path / 'blob'}; echo oops >&2; exit 42")
    assert result.stdout == blob
    assert result.stderr == b"oops\n"
    assert result.returncode == 42


@pytest.mark.parametrize("code", [0, 1, 3])
def test_exit_code_is_the_commands(served: ProxyProcess, code: int) -> None:
    """The CLI exits with the remote command's own exit code."""
    assert cli(served.url, "--", "sh", "-c", f"exit {code}").returncode == code


def test_timeout_exits_124(served: ProxyProcess) -> None:
    """Running out of time exits 124, like coreutils timeout, with a note on stderr."""
    result = cli(served.url, "--timeout", "0.3", "--", "sleep", "30")
    assert result.returncode == 124
    assert b"timeout" in result.stderr


def test_signal_death_exits_128_plus_n(served: ProxyProcess) -> None:
    """A command killed by signal N exits 128+N, as in a shell."""
    assert cli(served.url, "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_stdin_is_forwarded_with_dash_i(served: ProxyProcess) -> None:
    """-i sends this process's stdin (bytes) to the command, then EOF."""
    data = bytes(range(256)) * 10
    result = cli(served.url, "-i", "--", "cat", stdin=data)
    assert result.stdout == data
    assert result.returncode == 0


def test_without_dash_i_stdin_is_not_sent(served: ProxyProcess) -> None:
    """Without -i the command reads EOF at once."""
    result = cli(served.url, "--", "cat", stdin=b"ignored")
    assert result.stdout == b""
    assert result.returncode == 0


def test_env_and_workdir_options(served: ProxyProcess, tmp_path: Path) -> None:
    """-e NAME=VALUE and --workdir reach the command."""
    result = cli(served.url, "-e", "GREETING=a b=c", "--workdir", str(tmp_path), "--",
                 "sh", "-c", 'printf "%s|%s" "$GREETING" "$PWD"')  # fmt: skip
    assert result.stdout.decode() == f"a b=c|{tmp_path}"


def test_url_from_environment(served: ProxyProcess) -> None:
    """SESSION_PROXY_URL is used when --url is not given."""
    result = subprocess.run(
        [sys.executable, "-m", "session_proxy", "exec", "--", "echo", "hi"],
        capture_output=True, timeout=60, env={**os.environ, "SESSION_PROXY_URL": served.url},
    )  # fmt: skip
    assert result.stdout == b"hi\n"


def test_unreachable_proxy_exits_125_with_a_message() -> None:
    """No proxy listening: exit 125 and a message saying where it tried."""
    result = cli("http://127.0.0.1:9", "--", "true")
    assert result.returncode == 125
    assert b"cannot reach session-proxy at http://127.0.0.1:9" in result.stderr


def test_refusal_exits_125_with_the_reason(served: ProxyProcess) -> None:
    """A refused request (here an invalid workdir) exits 125 and shows the proxy's reason."""
    result = cli(served.url, "--workdir", "relative", "--", "true")
    assert result.returncode == 125
    assert b"422 invalid_request" in result.stderr
    assert b"workdir" in result.stderr


def test_missing_program_exits_127(served: ProxyProcess) -> None:
    """An unknown program exits 127, as in a shell."""
    result = cli(served.url, "--", "no-such-program-xyz")
    assert result.returncode == 127
    assert b"no-such-program-xyz" in result.stderr


def test_no_command_is_a_usage_error(served: ProxyProcess) -> None:
    """`exec` with nothing to run exits 2 with usage help."""
    result = cli(served.url)
    assert result.returncode == 2
    assert b"no command given" in result.stderr


def test_idle_timeout_exits_124(spawn_proxy: Callable[..., ProxyProcess]) -> None:
    """A command ended for silence exits 124 as a wall-clock timeout does."""
    proxy = spawn_proxy("--idle-timeout", "0.3")
    result = cli(proxy.url, "--", "sleep", "30")
    assert result.returncode == 124
    assert b"idle_timeout" in result.stderr


def test_output_limit_exits_125(spawn_proxy: Callable[..., ProxyProcess]) -> None:
    """Output past the cap exits 125 (the proxy ended it), with the reason on stderr."""
    proxy = spawn_proxy("--max-output-bytes", "1000")
    result = cli(proxy.url, "--", "sh", "-c", "while :; do echo xxxxxxxxxxxxxxxx; done")
    assert result.returncode == 125
    assert len(result.stdout) == 1000
    assert result.stderr.startswith(b"session-proxy: command ended (output_limit)")


def test_shutdown_exits_125(spawn_proxy: Callable[..., ProxyProcess], marker: str) -> None:
    """A proxy stopping under a running command: the CLI exits 125 and says shutdown."""
    proxy = spawn_proxy("--shutdown-grace", "0", "--kill-grace", "1")
    command = [sys.executable, "-m", "session_proxy", "exec", "--url", proxy.url, "--", "sleep", marker]
    running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not [p for p in processes_with(marker) if p.name() == "sleep"]:  # the CLI has it too
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.02)
        proxy.process.send_signal(signal.SIGTERM)
        _, stderr = running.communicate(timeout=30)
    finally:
        running.kill()
    assert running.returncode == 125
    assert stderr.startswith(b"session-proxy: command ended (shutdown)")
    assert proxy.process.wait(timeout=30) == 0


def test_unix_socket_with_the_cli_and_a_chosen_mode(
    spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """On ``--listen unix:/path --unix-socket-mode 600`` the socket has mode 600 and the CLI works."""
    path = tmp_path / "exec.sock"
    proxy = spawn_proxy("--listen", f"unix:{path}", "--unix-socket-mode", "600")
    assert proxy.url == f"unix:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = cli(proxy.url, "--", "sh", "-c", "echo over-unix; exit 4")
    assert (result.stdout, result.returncode) == (b"over-unix\n", 4)


async def test_exec_client_over_a_unix_socket(
    spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """``ExecClient("unix:/path")`` runs a command through a Unix-socket listener."""
    path = tmp_path / "exec.sock"
    proxy = spawn_proxy("--listen", f"unix:{path}")
    async with ExecClient(proxy.url) as client:
        events = [event async for event in client.exec(["echo", "hello"])]
    assert isinstance(events[-1], ExitEvent)
    assert events[-1].exit_code == 0
    assert b"".join(e.payload() for e in events if isinstance(e, OutputEvent)) == b"hello\n"


def test_ops_listener_can_be_disabled(spawn_proxy: Callable[..., ProxyProcess]) -> None:
    """``--ops-listen ""`` starts no ops listener (logged as null); the exec API still works."""
    proxy = spawn_proxy("--ops-listen", "")
    assert proxy.ops_url is None
    assert cli(proxy.url, "--", "echo", "ok").stdout == b"ok\n"


def test_text_log_format(spawn_proxy: Callable[..., ProxyProcess]) -> None:
    """``--log-format text`` writes plain lines (level, logger, message, key=value), not JSON."""
    proxy = spawn_proxy("--log-format", "text")
    assert cli(proxy.url, "--", "true").returncode == 0
    deadline = time.monotonic() + 10
    while b"exec finished" not in proxy.log_path.read_bytes():
        assert time.monotonic() < deadline, proxy.log_path.read_text()
        time.sleep(0.02)
    lines = proxy.log_path.read_text().splitlines()
    assert lines[0].startswith("info    session_proxy.server: listening exec_url=http://127.0.0.1:")
    finished = next(line for line in lines if "exec finished" in line)
    assert finished.startswith("info    session_proxy.streaming: exec finished exec_id=")
    assert "outcome=exited" in finished
    assert not any(line.startswith("{") for line in lines)


async def serve_raw(answer: bytes) -> tuple[asyncio.Server, str]:
    """A TCP server that reads one request's head and body, answers ``answer`` raw, and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def ndjson_answer(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (ndjson_answer(b'{"type":"bogus"}\n'), b"an event this client cannot read"),
        (ndjson_answer(b"not json!\n"), b"an event this client cannot read"),
        (b"", b"closed the connection early"),
    ],
)
async def test_broken_answers_exit_125_with_one_line(answer: bytes, said: bytes) -> None:
    """An unreadable event or a connection closed without an answer: 125 and one line, no traceback."""
    server, url = await serve_raw(answer)
    out, err = io.BytesIO(), io.BytesIO()
    async with server:
        code = await run_exec_command(
            ["true"], url=url, workdir=None, env={}, stdin=None, timeout=None, stdout=out, stderr=err
        )
    assert code == 125
    assert err.getvalue().count(b"\n") == 1
    assert err.getvalue().startswith(b"session-proxy: ")
    assert said in err.getvalue()


async def test_leaving_the_events_block_ends_the_command_at_once(
    spawn_proxy: Callable[..., ProxyProcess], marker: str
) -> None:
    """Breaking out of ``async with client.exec(...)`` closes the stream: the command is gone
    while the client (and the caller's reference to the events) still lives."""
    proxy = spawn_proxy()
    async with ExecClient(proxy.url) as client:
        async with client.exec(["sh", "-c", f"echo started; sleep {marker}"]) as events:
            async for event in events:
                if isinstance(event, OutputEvent):
                    break
        assert processes_with(marker)  # still referenced and the session open; yet:
        assert await survivors(marker) == []


async def test_a_connect_timeout_is_unreachable_not_a_traceback() -> None:
    """A listener whose accept queue is full never completes the handshake: the client gives up
    after its connect timeout with ``ProxyUnreachable``, not aiohttp's own exception."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        url = f"http://127.0.0.1:{full.getsockname()[1]}"
        queued = []
        for _ in range(3):  # fill the accept queue: later handshakes get no answer
            waiting = socket.socket()
            waiting.setblocking(False)
            waiting.connect_ex(full.getsockname())
            queued.append(waiting)
        try:
            async with ExecClient(url, connect_timeout=0.5) as client:
                with pytest.raises(ProxyUnreachable, match="cannot reach session-proxy"):
                    async for _ in client.exec(["true"]):
                        pass
        finally:
            for waiting in queued:
                waiting.close()
