"""The workspace scripts on their own, run by dash, bash and busybox sh as an image would."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest

from session_proxy.backends.kubernetes.wrapper import (
    KILL_SCRIPT,
    PROBE_SCRIPT,
    SHELL,
    WRAPPER_SCRIPT,
    encode_header,
)

from .conftest import processes_with

SHELLS = [["dash"], ["bash"], ["busybox", "sh"]]
SCRIPTS = {"wrapper": WRAPPER_SCRIPT, "kill": KILL_SCRIPT, "probe": PROBE_SCRIPT}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_scripts_parse_and_carry_no_comments(shell: list[str]) -> None:
    """Each script, as sent in the exec URL, parses in each shell, with its comments and
    indentation left at home."""
    for name, script in SCRIPTS.items():
        result = subprocess.run([*shell, "-n", "-c", script], capture_output=True, check=False)
        assert result.returncode == 0, (name, result.stderr)
        assert not [line for line in script.splitlines() if line.startswith(("#", " "))], name


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
@pytest.mark.parametrize("group", ["0", "00", "", "x", "-3", "3 4"])
def test_kill_script_refuses_what_is_not_a_group_id(shell: list[str], group: str) -> None:
    """A group id that is not a number above 1 is refused (exit 2): `kill -TERM -0` would hit
    the kill exec's own group. (1, every process, is refused the same way; not run here.)"""
    result = subprocess.run(
        [*shell, "-c", KILL_SCRIPT], input=f"{group}\n1\n".encode(), capture_output=True,
        start_new_session=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_kill_script_wakes_a_stopped_group_to_take_its_term(shell: list[str], tmp_path: Path) -> None:
    """A stopped group gets CONT after TERM, so it ends through its TERM handler within the
    grace instead of being KILLed unawares."""
    flag = tmp_path / "termed"
    script = f"trap 'echo > {flag}; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    with subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True) as group:
        try:
            assert group.stdout is not None
            assert group.stdout.readline() == b"ready\n"
            # Not /usr/bin/kill: procps-ng 4.0.2 turns `kill -STOP -PGID` into kill(-1, SIGSTOP).
            os.killpg(group.pid, signal.SIGSTOP)
            wait_until_stopped(group.pid)
            result = subprocess.run(
                [*shell, "-c", KILL_SCRIPT], input=f"{group.pid}\n2\n".encode(), capture_output=True,
                timeout=20, check=False,
            )  # fmt: skip
            assert result.returncode == 0, result
            assert group.wait(timeout=10) == 0
            assert flag.exists(), "the group was KILLed, never having seen its TERM"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group.pid, signal.SIGKILL)


def wait_until_stopped(pgid: int, within: float = 10.0) -> None:
    """Until no member of the group runs: each is stopped (T), or is a parent held in vfork
    (D) by a child stopped before its exec, as dash does it."""
    deadline = time.monotonic() + within
    while True:
        states = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[2] == str(pgid):
                states.append(fields[0])
        if "T" in states and set(states) <= {"T", "D"}:
            return
        assert time.monotonic() < deadline, f"the group never stopped: {states}"
        time.sleep(0.01)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_stdin_closing_at_once_still_ends_the_command(shell: list[str], marker: str) -> None:
    """Stdin that closes right after the header (a client gone at once) ends the command every
    time, even when the stop comes before the command has reached its own group."""
    header = encode_header(nonce="ab" * 16, argv=["sh", "-c", f"sleep {marker} & sleep {marker}"],
                           workdir=None, env={}, stdin_length=0, deadline=60, grace=1)  # fmt: skip
    hung = 0
    for _ in range(40):
        with subprocess.Popen(
            [*shell, "-c", WRAPPER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        ) as wrapper:  # fmt: skip
            assert wrapper.stdin is not None
            wrapper.stdin.write(header)
            wrapper.stdin.close()
            try:
                wrapper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                hung += 1
                os.killpg(wrapper.pid, signal.SIGKILL)
                for process in processes_with(marker):
                    process.kill()
    assert hung == 0


def run_wrapper(shell: list[str], header: bytes, env: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """The wrapper fed ``header``, its stdin kept open (a closed one is the dead-man switch)
    until it reported an end or exited; its stdout and stderr."""
    with subprocess.Popen(
        [*shell, "-c", WRAPPER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True, env={**os.environ, **(env or {})},
    ) as wrapper:  # fmt: skip
        assert wrapper.stdin is not None
        try:
            wrapper.stdin.write(header)
            wrapper.stdin.flush()
            output = {"out": b"", "err": b""}
            with selectors.DefaultSelector() as selector:
                selector.register(wrapper.stdout, selectors.EVENT_READ, "out")  # type: ignore[arg-type]
                selector.register(wrapper.stderr, selectors.EVENT_READ, "err")  # type: ignore[arg-type]
                while selector.get_map():
                    if re.search(rb":(exit:[0-9a-z:]+|error:[a-z]+)\x1e", output["err"]):
                        wrapper.stdin.close()
                    for key, _ in selector.select(timeout=30):
                        data = os.read(key.fd, 65536)
                        output[key.data] += data
                        if not data:
                            selector.unregister(key.fileobj)
            wrapper.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(wrapper.pid, signal.SIGKILL)
    return output["out"], output["err"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_header_values_arrive_byte_for_byte(shell: list[str]) -> None:
    """Every value reaches the command exactly: empty, newlines (trailing ones too), quotes,
    `$(...)`, backslashes, bytes that are not UTF-8, and 100 KB at once."""
    values = ["", "a\nb\n\n", "'\"$(id)`id`\\0101\\n", "\udcff\udcfe", "x" * 100_000, "-n", "=:.", "\t \r"]
    header = encode_header(nonce="ab" * 16, argv=["sh", "-c", 'for a; do printf "%s\\036" "$a"; done', "sh",
                           *values], workdir=None, env={}, stdin_length=0, deadline=60, grace=1)  # fmt: skip
    out, err = run_wrapper(shell, header)
    assert b":exit:0" in err, err
    expected = b"".join(value.encode("utf-8", "surrogateescape") + b"\x1e" for value in values)
    assert out.startswith(expected), out[:300]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
@pytest.mark.parametrize("tmpdir", ["", "/nonexistent"], ids=["fifo", "pipe"])
def test_stdin_reaches_the_command_exactly(shell: list[str], tmpdir: str) -> None:
    """The command gets exactly its stdin bytes, then EOF: through a FIFO, or through a pipe
    where no FIFO can be made (no writable temporary directory), and no FIFO is left behind."""
    data = b"line\n\x00\xff" * 10_000 + b"no newline at the end"
    header = encode_header(nonce="ab" * 16, argv=["sh", "-c", "cat; echo EOF"], workdir=None, env={},
                           stdin_length=len(data), deadline=60, grace=1)  # fmt: skip
    before = set(Path("/tmp").glob(".session-proxy-stdin-*"))
    out, err = run_wrapper(shell, header + data, env={"TMPDIR": tmpdir} if tmpdir else None)
    assert b":exit:0" in err, err
    assert out.startswith(data + b"EOF\n"), out[-200:]
    assert set(Path("/tmp").glob(".session-proxy-stdin-*")) <= before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_a_header_cut_short_runs_nothing(shell: list[str], tmp_path: Path) -> None:
    """A header that ends before its last byte (stdin closed in the middle of a long value)
    starts nothing and reports nothing."""
    flag = tmp_path / "ran"
    header = encode_header(nonce="ab" * 16, argv=["sh", "-c", f": > {flag}", "x" * 5000], workdir=None,
                           env={}, stdin_length=0, deadline=60, grace=1)  # fmt: skip
    result = subprocess.run([*shell, "-c", WRAPPER_SCRIPT], input=header[:-10], capture_output=True,
                            start_new_session=True, timeout=30, check=False)  # fmt: skip
    assert (result.stdout, result.stderr, result.returncode) == (b"", b"", 90)
    assert not flag.exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_a_stop_during_wait_never_reports_its_own_status(shell: list[str]) -> None:
    """When the dead-man switch ends the command, the exit marker carries the command's status
    (143, its TERM), never the status of the `wait` that the stop's signal cut short (138,
    128 + USR1): that wait is waited again. A race, so tried many times."""
    header = encode_header(nonce="ab" * 16, argv=["sh", "-c", "sleep 30 & cat; wait"], workdir=None,
                           env={}, stdin_length=1, deadline=60, grace=1)  # fmt: skip
    statuses = set()
    for _ in range(30):
        with subprocess.Popen(
            [*shell, "-c", WRAPPER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
        ) as wrapper:  # fmt: skip
            assert wrapper.stdin is not None
            assert wrapper.stderr is not None
            try:
                wrapper.stdin.write(header + b"x")
                wrapper.stdin.flush()
                err = b""
                while b":pgid:" not in err and (data := wrapper.stderr.read1(4096)):
                    err += data
                wrapper.stdin.close()  # the proxy is gone: the dead-man switch fires
                err += wrapper.stderr.read()
                wrapper.wait(timeout=30)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(wrapper.pid, signal.SIGKILL)
        assert b":gone\x1e" in err, err
        statuses.add(err.rsplit(b":exit:", 1)[1].split(b"\x1e")[0].split(b":")[0])
    assert statuses == {b"143"}


def test_wrapper_exec_request_line_fits_8_kib() -> None:
    """The wrapper travels in every exec URL: its request line stays inside the 8 KiB that
    common proxies (nginx's default buffers) and aiohttp accept."""
    from session_proxy.backends.kubernetes.api import exec_target

    argv = [SHELL, "-c", WRAPPER_SCRIPT]
    target = exec_target("a-namespace-name", "a-workspace-pod-name", "workspace", argv, stdin=True)
    request_line = f"GET {target} HTTP/1.1\r\n"
    assert len(request_line) < 8 * 1024 - 128, len(request_line)
