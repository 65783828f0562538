"""The workspace supervisor's cost: its size, and per exec against the shell wrapper and the
floor, with a 1 MB argv or env (through the proxy, both runners are in bench/run.py's warm
section).

Per exec (no proxy, no API server: local pipes, as an exec's are), each contender pre-opened
(started and waiting on its stdin before the clock starts), p50 of `true`:
  floor        a plain `sh` reading one line, then running /bin/true
  supervisor   the supervisor, sent its header
  wrapper      `sh -c <wrapper script>` (the shell wrapper), sent its header
"to exit" ends when the exit is reported (the marker; the floor's EOF); "to stream end" when
both output pipes are closed.

Usage: python bench/supervisor.py [--runs 200]   (prints a Markdown section; bench/run.py
writes it into BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from session_proxy.backends.kubernetes import supervisor_protocol, wrapper  # noqa: E402
from tests.supervisor_build import supervisor_binary  # noqa: E402

SHELL = "dash"  # Debian's /bin/sh
ARG = "y" * (128 * 1024 - 1)  # the kernel's limit per argv or env string, less one


def read_until(process: subprocess.Popen[bytes], needle: bytes | None) -> None:
    """Read stdout and stderr until ``needle`` appears in stderr, or (None) until both end."""
    assert process.stdout is not None
    assert process.stderr is not None
    fds = {process.stdout.fileno(), process.stderr.fileno()}
    seen = b""
    while fds:
        ready, _, _ = select.select(list(fds), [], [])
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                fds.discard(fd)
            elif fd == process.stderr.fileno() and needle is not None:
                seen += chunk
                if needle in seen:
                    return


def one_run(argv: list[str], request: bytes, needle: bytes | None) -> float:
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    time.sleep(0.02)  # pre-opened: started and waiting before the clock starts
    started = time.perf_counter()
    process.stdin.write(request)
    process.stdin.flush()
    read_until(process, needle)
    elapsed = time.perf_counter() - started
    process.stdin.close()
    process.wait()
    process.stdout.close()  # type: ignore[union-attr]
    process.stderr.close()  # type: ignore[union-attr]
    return elapsed


def supervisor_request(argv: list[str], env: dict[str, str]) -> tuple[bytes, bytes]:
    nonce = wrapper.new_nonce()
    header = supervisor_protocol.encode_header(
        nonce=nonce, argv=argv, workdir=None, env=env, stdin_length=0, deadline=60, grace=1
    )
    return header, f"\x1eSP{nonce}:".encode()


def wrapper_request(argv: list[str], env: dict[str, str]) -> tuple[bytes, bytes]:
    nonce = wrapper.new_nonce()
    header = wrapper.encode_header(
        nonce=nonce, argv=argv, workdir=None, env=env, stdin_length=0, deadline=60, grace=1
    )
    return header, f"\x1eSP{nonce}:".encode()


def p50_ms(runs: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(runs)) * 1000


def per_exec(binary: Path, runs: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    floor = [SHELL, "-c", "read -r line; /bin/true"]
    figures["floor"] = p50_ms(runs, lambda: one_run(floor, b"go\n", None))
    wrapped = [SHELL, "-c", wrapper.WRAPPER_SCRIPT]

    def supervised(argv: list[str], env: dict[str, str], kind: str, to_end: bool = False) -> float:
        header, prefix = supervisor_request(argv, env)
        return one_run([str(binary)], header, None if to_end else prefix + kind.encode())

    def shell(argv: list[str], env: dict[str, str], kind: str) -> float:
        header, prefix = wrapper_request(argv, env)
        return one_run(wrapped, header, prefix + kind.encode())

    figures["supervisor to exit"] = p50_ms(runs, lambda: supervised(["true"], {}, "exit:"))
    figures["supervisor to stream end"] = p50_ms(runs, lambda: supervised(["true"], {}, "", to_end=True))
    figures["wrapper to exit"] = p50_ms(runs, lambda: shell(["true"], {}, "exit:"))
    few = max(3, runs // 20)
    big_env = {f"BIG{i}": ARG[: len(ARG) - 6] for i in range(8)}
    big_argv = ["true", *[ARG] * 8]
    figures["supervisor 1 MB argv to start"] = p50_ms(few, lambda: supervised(big_argv, {}, "pgid:"))
    figures["supervisor 1 MB env to start"] = p50_ms(few, lambda: supervised(["true"], big_env, "pgid:"))
    figures["wrapper 1 MB argv to start"] = p50_ms(few, lambda: shell(big_argv, {}, "pgid:"))
    figures["wrapper 1 MB env to start"] = p50_ms(few, lambda: shell(["true"], big_env, "pgid:"))
    return figures


def render(size: int, direct: dict[str, float], runs: int, command: str) -> str:
    lines = [
        "## The workspace supervisor: size and per-exec cost",
        "",
        f"`{command}` (p50 of {runs} runs, the 1 MB rows {max(3, runs // 20)}; `{SHELL}` as sh; "
        f"{os.cpu_count()} cores). The binary: **{size / 1024:.0f} KiB**, static (musl), no runtime "
        "dependency.",
        "",
        "| per exec, pre-opened, local pipes | p50 (ms) |",
        "|---|---:|",
        *(f"| {name} | {value:.2f} |" for name, value in direct.items()),
        "",
        f"Supervisor over the floor: **{direct['supervisor to exit'] - direct['floor']:+.2f} ms** to the exit "
        f"report, {direct['supervisor to stream end'] - direct['floor']:+.2f} ms to the stream's end (target: "
        f"within 1.5 ms); the shell wrapper: {direct['wrapper to exit'] - direct['floor']:+.2f} ms to the exit "
        "report (it forks the command through `setsid`, a dead-man watcher and a timer; the supervisor "
        "does all three in one process). Through the proxy, both runners are in the warm section above.",
    ]
    return "\n".join(lines) + "\n"


def section(runs: int, command: str) -> str:
    binary = supervisor_binary()
    return render(binary.stat().st_size, per_exec(binary, runs), runs, command)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200)
    runs = parser.parse_args().runs
    print(section(runs, f"python bench/supervisor.py --runs {runs}"))


if __name__ == "__main__":
    main()
