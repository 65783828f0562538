"""`session-proxy exec`: byte-exact output on the right streams and meaningful exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import ProxyProcess


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
