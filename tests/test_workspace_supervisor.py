"""The workspace supervisor on its own: the static program run as the exec would run it, its
header written to its stdin, its markers read from its output."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from session_proxy.backends.kubernetes.supervisor_protocol import VERSION_LINE, encode_header
from session_proxy.backends.kubernetes.wrapper import MarkerFilter, new_nonce

from .conftest import processes_with, survivors
from .supervisor_build import supervisor_binary


@pytest.fixture(scope="session")
def binary() -> Path:
    return supervisor_binary()


@dataclass
class Finished:
    code: int
    stdout: bytes
    stderr: bytes
    markers: list[str]  # "kind:value", stderr's then stdout's


def start(binary: Path, argv: list[str], **fields: object) -> tuple[subprocess.Popen[bytes], str]:
    """The supervisor with its header (and the user's stdin, when given) written to it."""
    nonce = new_nonce()
    stdin = bytes(fields.pop("stdin", b""))  # type: ignore[call-overload]
    header = encode_header(
        nonce=nonce,
        argv=argv,
        workdir=fields.pop("workdir", None),  # type: ignore[arg-type]
        env=fields.pop("env", {}),  # type: ignore[arg-type]
        stdin_length=len(stdin),
        deadline=fields.pop("deadline", 60.0),  # type: ignore[arg-type]
        grace=fields.pop("grace", 1.0),  # type: ignore[arg-type]
    )
    process = subprocess.Popen(
        [str(binary)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=fields.pop("environ", None),  # type: ignore[arg-type]
    )
    assert process.stdin is not None
    process.stdin.write(header + stdin)
    process.stdin.flush()
    return process, nonce


def finish(
    process: subprocess.Popen[bytes], nonce: str, *, close: bool = False, timeout: float = 30
) -> Finished:
    """Read both streams to their end (closing stdin first when told to: the dead-man switch) and wait."""
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    if close:
        process.stdin.close()
    stdout, stderr = read_to_end(process.stdout, process.stderr, timeout)
    process.wait(timeout=timeout)
    for pipe in (process.stdin, process.stdout, process.stderr):
        pipe.close()
    markers = []
    streams = []
    for data in (stderr, stdout):
        clean, found = MarkerFilter(nonce).feed(data)
        streams.append(clean)
        markers += [f"{m.kind}:{m.value}" for m in found]
    return Finished(process.returncode, streams[1], streams[0], markers)


def read_to_end(stdout: IO[bytes], stderr: IO[bytes], timeout: float) -> tuple[bytes, bytes]:
    """Both pipes read to EOF, stdin left as it is (communicate would close it)."""
    data = {stdout.fileno(): bytearray(), stderr.fileno(): bytearray()}
    open_fds = set(data)
    deadline = time.monotonic() + timeout
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the supervisor's output did not end"
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                data[fd] += chunk
            else:
                open_fds.discard(fd)
    return bytes(data[stdout.fileno()]), bytes(data[stderr.fileno()])


def run(binary: Path, argv: list[str], **fields: object) -> Finished:
    process, nonce = start(binary, argv, **fields)
    return finish(process, nonce)


def wait_for_marker(process: subprocess.Popen[bytes], nonce: str, kind: str) -> bytes:
    """Read stderr until the marker ``kind`` arrives; what was read."""
    assert process.stderr is not None
    seen = b""
    while f"\x1eSP{nonce}:{kind}".encode() not in seen:
        chunk = os.read(process.stderr.fileno(), 65536)
        assert chunk, seen
        seen += chunk
    return seen


def wait_for_escape(marker: str, within: float = 30.0) -> None:
    """Until two processes carry ``marker`` in different sessions: one has left the command's."""
    deadline = time.monotonic() + within
    while len({os.getsid(p.pid) for p in processes_with(marker) if p.is_running()}) < 2:
        assert time.monotonic() < deadline, "no process left the command's session"
        time.sleep(0.01)


@pytest.fixture
def kill_marked(marker: str) -> Iterator[None]:
    yield
    for process in processes_with(marker):
        process.kill()


def test_version(binary: Path) -> None:
    """``--version`` names the protocol: the probe that tells a pod carries the supervisor."""
    result = subprocess.run([str(binary), "--version"], capture_output=True, check=True)
    assert result.stdout == VERSION_LINE


def test_runs_argv_env_workdir_and_stdin_exactly(binary: Path, tmp_path: Path) -> None:
    """argv and env bytes arrive as sent (shell syntax, newlines, non-UTF-8), the workdir is
    set, the command reads exactly the user's stdin then EOF, and the markers say start, exit
    and that nothing is left."""
    odd = "a b $(echo no) `no` 'q' \"d\"\n\\x \udcff end"
    script = 'pwd; printf "%s|" "$1" "$ODD"; cat; echo "[$PRESET]"'
    result = run(
        binary, ["sh", "-c", script, "sh", odd], workdir=str(tmp_path), env={"ODD": odd}, stdin=b"in\0put"
    )
    expected_odd = odd.encode("utf-8", "surrogateescape")
    assert (
        result.stdout == str(tmp_path).encode() + b"\n" + expected_odd + b"|" + expected_odd + b"|in\0put[]\n"
    )
    assert [m.split(":")[0] for m in result.markers] == ["pgid", "exit", "left", "end"]
    assert result.markers[1:] == ["exit:0", "left:0", "end:stdout"]
    assert result.code == 0


def test_request_env_overrides_inherited_env(binary: Path) -> None:
    """The request's entries replace inherited ones of the same name; the rest is inherited."""
    inherited = {"PATH": os.environ["PATH"], "KEEP": "kept", "OVER": "old"}
    process, nonce = start(binary, ["sh", "-c", 'echo "$KEEP $OVER"'], env={"OVER": "new"}, environ=inherited)
    assert finish(process, nonce).stdout == b"kept new\n"


def test_exit_status_of_a_signal_is_128_plus_n(binary: Path) -> None:
    """A command killed by signal N reports 128+N, as a shell's ``$?`` does."""
    assert "exit:137" in run(binary, ["sh", "-c", "kill -KILL $$"]).markers


def test_program_not_found_and_bad_workdir(binary: Path) -> None:
    """A missing program or workdir is reported as such, and nothing runs."""
    assert run(binary, ["no-such-program-x"]).markers == ["error:notfound"]
    assert run(binary, ["true"], workdir="/no/such/dir").markers == ["error:workdir"]
    assert run(binary, ["true"], env={"PATH": "/nowhere"}).markers == ["error:notfound"]


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"", 90),  # stdin closed while waiting (an unused warm exec)
        (b"SPB1\0\0", 90),
        (b"SPB2\0\0\0\0", 91),
        (b"SPB1\0\0\0\x05hello", 91),
        (b"SPB1\xff\xff\xff\xff", 91),  # over the body limit
    ],
)
def test_short_or_malformed_header_runs_nothing(binary: Path, header: bytes, code: int) -> None:
    """A header cut short or malformed ends the supervisor with its own status, silently."""
    result = subprocess.run([str(binary)], input=header, capture_output=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (code, b"", b"")


def test_deadline_ends_a_command_and_its_escaped_children(
    binary: Path, marker: str, kill_marked: None
) -> None:
    """At the deadline every descendant ends, a double-forked child in its own session too,
    and the supervisor exits only once nothing is left."""
    script = f"(setsid sleep {marker} >/dev/null 2>&1 &); sleep {marker} & sleep {marker}"
    process, nonce = start(binary, ["sh", "-c", script], deadline=1.0, grace=1.0)
    result = finish(process, nonce)
    assert result.markers[1:3] == ["deadline:", "exit:143"]
    assert processes_with(marker) == []


def test_stdin_eof_ends_everything(binary: Path, marker: str, kill_marked: None) -> None:
    """Stdin EOF (the proxy is gone) ends the command and an escaped child: the dead-man switch."""
    script = f"(setsid sleep {marker} >/dev/null 2>&1 &); echo started; sleep {marker}"
    process, nonce = start(binary, ["sh", "-c", script])
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    wait_for_escape(marker)
    result = finish(process, nonce, close=True)
    assert result.markers[1:3] == ["gone:", "exit:143"]
    assert processes_with(marker) == []


def test_control_request_ends_after_unread_stdin(binary: Path, marker: str, kill_marked: None) -> None:
    """The end request after the command's stdin arrives even when the command never reads its
    1 MB of stdin: the supervisor takes its stdin whole, so the control channel stays open."""
    process, nonce = start(binary, ["sleep", marker], stdin=b"x" * (1024 * 1024))
    assert process.stdin is not None
    wait_for_marker(process, nonce, "pgid")
    process.stdin.write(b"T")
    process.stdin.flush()
    result = finish(process, nonce)
    assert "exit:143" in result.markers
    assert "gone:" not in result.markers


def test_term_ignored_means_kill_after_grace(binary: Path, marker: str, kill_marked: None) -> None:
    """A command that ignores TERM is killed once the grace is over."""
    process, nonce = start(binary, ["sh", "-c", f"trap '' TERM; sleep {marker}"], grace=0.5)
    wait_for_marker(process, nonce, "pgid")
    deadline = time.monotonic() + 30
    while not processes_with(marker):  # the sleep runs: the shell has set its trap (else TERM kills it)
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.01)
    assert process.stdin is not None
    process.stdin.write(b"T")
    process.stdin.flush()
    assert "exit:137" in finish(process, nonce).markers


def test_streams_released_at_the_markers_while_leftovers_are_ended(
    binary: Path, marker: str, kill_marked: None
) -> None:
    """After a normal exit with a leftover (which does not hold the output), the supervisor
    says ``left:1`` and lets go of the output streams at once, though it still waits (here for
    a long grace) to end the leftover; it exits once that is gone."""
    script = f"trap '' TERM; sleep {marker} >/dev/null 2>&1 </dev/null & exit 3"  # in the session
    process, nonce = start(binary, ["sh", "-c", script], grace=120.0)
    assert process.stdout is not None
    assert process.stderr is not None
    stderr = process.stderr.read()  # to EOF: no holder left but a leftover that holds nothing
    stdout = process.stdout.read()
    markers = [f"{m.kind}:{m.value}" for m in MarkerFilter(nonce).feed(stderr + stdout)[1]]
    assert markers[1:] == ["exit:3", "left:1", "end:stdout"]
    assert process.poll() is None  # still ending the leftover
    assert len(processes_with(marker)) == 1
    for leftover in processes_with(marker):
        leftover.kill()
    assert process.wait(timeout=30) == 0
    for pipe in (process.stdin, process.stdout, process.stderr):
        pipe.close()  # type: ignore[union-attr]


async def test_leftover_after_normal_exit_is_ended(binary: Path, marker: str) -> None:
    """A leftover of a normal exit is ended a moment later (the README's policy)."""
    process, nonce = start(binary, ["sh", "-c", f"sleep {marker} >/dev/null 2>&1 & exit 0"])
    assert process.stderr is not None
    wait_for_marker(process, nonce, "left:1")
    assert await survivors(marker) == []
    assert process.wait(timeout=30) == 0
    process.stdin.close()  # type: ignore[union-attr]
    process.stdout.close()  # type: ignore[union-attr]
    process.stderr.close()


def test_waits_for_the_header_without_output(binary: Path) -> None:
    """Before its header the supervisor prints nothing (a warm exec's watcher counts on it)."""
    process = subprocess.Popen(
        [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout, process.stderr], [], [], 0.2)
    assert ready == []
    stdout, stderr = process.communicate(timeout=30)
    assert (process.returncode, stdout, stderr) == (90, b"", b"")


def test_large_argv_and_env(binary: Path) -> None:
    """1 MB of argv (eight 128 KB arguments, the kernel's limit per string less one) and a
    100 KB env value arrive whole."""
    part = "y" * (128 * 1024 - 1)
    started = time.monotonic()
    result = run(
        binary, ["sh", "-c", 'printf %s "$*$BIG" | wc -c', "sh", *[part] * 8], env={"BIG": "z" * 100_000}
    )
    assert result.stdout.strip() == str(8 * len(part) + 7 + 100_000).encode()
    assert time.monotonic() - started < 60  # a sanity bound; figures are in the benchmark


def test_detached_process_outlives_a_normal_exit(binary: Path, marker: str, kill_marked: None) -> None:
    """The README's policy: after the command exits on its own, a process in a session of its
    own that holds none of the output is left running (and not reported as left); one that
    still holds the output is ended."""
    detached = marker.replace("300.", "301.", 1)
    script = f"setsid sleep {detached} >/dev/null 2>&1 </dev/null & setsid sleep {marker} & echo started"
    try:
        process, nonce = start(binary, ["sh", "-c", script], grace=0.5)
        result = finish(process, nonce)  # the supervisor has exited: nothing of ours is left
        assert result.stdout == b"started\n"
        assert "exit:0" in result.markers
        assert processes_with(marker) == []
        assert [p for p in processes_with(detached) if p.status() != "zombie"]
    finally:
        for leftover in processes_with(detached):
            leftover.kill()
