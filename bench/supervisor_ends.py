"""Randomized early ends of the workspace supervisor: no hang, nothing left, ever.

Each run starts the supervisor (as an exec would: header on stdin, output on pipes) on a
command drawn at random (a plain sleeper, a forking one, one whose child double-forks into a
session of its own, one that ignores TERM, one that reads a stdin it is fed) and ends it at a
random moment in a random way: its deadline, an end request on its stdin, or stdin EOF (the
proxy gone). A run passes when the supervisor exits within a bound and no process of the run
is left. Prints the counts; exits 1 on any failure.

Usage: python bench/supervisor_ends.py [--runs 1000] [--seed N] [--binary PATH]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from session_proxy.backends.kubernetes.supervisor_protocol import END_REQUEST, encode_header  # noqa: E402
from session_proxy.backends.kubernetes.wrapper import new_nonce  # noqa: E402
from tests.supervisor_build import supervisor_binary  # noqa: E402

GRACE = 0.2
EXIT_BOUND = 10.0  # seconds from the end to the supervisor's exit: past it, a hang


def command(shape: str, tag: str) -> list[str]:
    scripts = {
        "sleeper": f"sleep {tag}",
        "forking": f"sleep {tag} & sleep {tag} & sleep {tag}",
        "escaping": f"(setsid sleep {tag} >/dev/null 2>&1 &); setsid sleep {tag} & sleep {tag}",
        "term-ignoring": f"trap '' TERM; sleep {tag} & sleep {tag}",
        "reading": f"cat >/dev/null; sleep {tag}",
    }
    return ["sh", "-c", scripts[shape]]


def left_over(tag: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and tag in " ".join(
                process.info["cmdline"] or []
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


def one_run(binary: Path, rng: random.Random) -> str | None:
    """One randomized early end; None when it passed, else what went wrong."""
    tag = f"300.{uuid.uuid4().int % 10**9:09d}"
    shape = rng.choice(["sleeper", "forking", "escaping", "term-ignoring", "reading"])
    how = rng.choice(["deadline", "request", "eof"])
    stdin = b"x" * rng.choice([0, 10, 200_000]) if shape == "reading" else b""
    deadline = rng.uniform(0.05, 0.5) if how == "deadline" else 60.0
    header = encode_header(
        nonce=new_nonce(), argv=command(shape, tag), workdir=None, env={},
        stdin_length=len(stdin), deadline=deadline, grace=GRACE,
    )  # fmt: skip
    process = subprocess.Popen(
        [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert process.stdin is not None
    try:
        process.stdin.write(header + stdin)
        process.stdin.flush()
        time.sleep(rng.uniform(0, 0.3))  # the end comes at any moment, even before the start
        if how == "request":
            process.stdin.write(END_REQUEST)
            process.stdin.flush()
        elif how == "eof":
            process.stdin.close()
        try:
            process.wait(timeout=deadline + GRACE + EXIT_BOUND)
        except subprocess.TimeoutExpired:
            return f"hang: {shape} ended by {how}"
    finally:
        if not process.stdin.closed:
            process.stdin.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    left = left_over(tag)
    for leftover in left:
        leftover.kill()
    return f"left {len(left)}: {shape} ended by {how}" if left else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--binary", type=Path, default=None, help="a supervisor built elsewhere")
    arguments = parser.parse_args()
    seed = arguments.seed if arguments.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    binary = arguments.binary or supervisor_binary()
    failures = [f for f in (one_run(binary, rng) for _ in range(arguments.runs)) if f]
    print(f"{arguments.runs} randomized early ends (seed {seed}): {len(failures)} failed")
    for failure in failures[:20]:
        print(f"  {failure}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
