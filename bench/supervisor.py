"""The workspace supervisor's cost: its size, per exec against the shell wrapper and the floor,
with a 1 MB argv or env, and warm `true` through the proxy under each runner.

Per exec (no proxy, no API server: local pipes, as an exec's are), each contender pre-opened
(started and waiting on its stdin before the clock starts), p50 of `true`:
  floor        a plain `sh` reading one line, then running /bin/true
  supervisor   the supervisor, sent its header
  wrapper      `sh -c <wrapper script>` (the shell wrapper), sent its header
"to exit" ends when the exit is reported (the marker; the floor's EOF); "to stream end" when
both output pipes are closed. Through the proxy: the Kubernetes API test server (real exec
protocol, real local processes) and a proxy with a warm pool, each sample with the pool full.

Usage: python bench/supervisor.py [--runs 200]   (prints a Markdown section)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

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
    few = max(3, runs // 20)
    # The wrapper holds on for a second after each exit (it waits for late leftovers): fewer runs.
    figures["wrapper to exit"] = p50_ms(max(3, runs // 4), lambda: shell(["true"], {}, "exit:"))
    big_env = {f"BIG{i}": ARG[: len(ARG) - 6] for i in range(8)}
    figures["supervisor 1 MB argv to start"] = p50_ms(
        few, lambda: supervised(["true", *[ARG] * 8], {}, "pgid:")
    )
    figures["supervisor 1 MB env to start"] = p50_ms(few, lambda: supervised(["true"], big_env, "pgid:"))
    # 1 MB would take the wrapper many seconds (it reads byte by byte and decodes \\0ooo escapes).
    figures["wrapper 100 KB argv to start"] = p50_ms(1, lambda: shell(["true", "y" * 100_000], {}, "pgid:"))
    return figures


async def through_proxy(binary: Path, runs: int, work: Path) -> dict[str, float]:
    """p50 of warm `true` through the proxy, under the supervisor and under the shell wrapper."""
    api = subprocess.Popen(
        [sys.executable, "-m", "tests.kube_api_server", "--dir", str(work / "api")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    processes = [api]
    figures: dict[str, float] = {}
    try:
        assert api.stdout is not None
        while not (found := re.search(r"kubeconfig: (\S+)", api.stdout.readline())):
            pass
        kubeconfig = found.group(1)
        async with aiohttp.ClientSession() as http:
            for runner, where in (("supervisor", str(binary)), ("shell", str(work / "none"))):
                log = work / f"proxy-{runner}.log"
                proxy = subprocess.Popen(
                    [sys.executable, "-m", "session_proxy", "serve", "--backend", "kubernetes",
                     "--kubeconfig", kubeconfig, "--session-name", "demo", "--listen", "127.0.0.1:0",
                     "--ops-listen", "", "--warm-execs", "1", "--workspace-supervisor", where,
                     "--log-format", "json"],
                    cwd=work, stderr=log.open("wb"), stdout=subprocess.DEVNULL,
                )  # fmt: skip
                processes.append(proxy)
                while not (match := re.search(r'"exec_url": "([^"]+)"', log.read_text())):
                    await asyncio.sleep(0.05)
                url = match.group(1)
                durations = []
                for index in range(runs + 3):
                    while index:  # each sample starts with the pool full (the first opens it)
                        async with http.get(f"{url}/status") as response:
                            if ((await response.json())["target"].get("warm_pool") or {}).get("ready"):
                                break
                        await asyncio.sleep(0.002)
                    started = time.perf_counter()
                    async with http.post(f"{url}/exec", json={"command": ["true"]}) as response:
                        body = await response.read()
                    if index >= 3:  # after warming up: discovery, probe, connections
                        durations.append(time.perf_counter() - started)
                    assert f'"runner":"{runner}"'.encode() in body, body[:300]
                    assert index == 0 or b'"warm":true' in body, body[:300]
                figures[f"proxy warm true, {runner}"] = statistics.median(durations) * 1000
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait()
    return figures


def render(size: int, direct: dict[str, float], proxied: dict[str, float], runs: int) -> str:
    lines = [
        "## The workspace supervisor: size and per-exec cost",
        "",
        f"`python bench/supervisor.py --runs {runs}` (p50 of {runs} runs; `{SHELL}` as sh; "
        f"{os.cpu_count()} cores, shared). The binary: **{size / 1024:.0f} KiB**, static (musl), "
        "no runtime dependency.",
        "",
        "| per exec, pre-opened, local pipes | p50 (ms) |",
        "|---|---:|",
        *(f"| {name} | {value:.2f} |" for name, value in direct.items()),
        "",
        f"Supervisor over the floor: **{direct['supervisor to exit'] - direct['floor']:+.2f} ms** to the exit "
        f"report, {direct['supervisor to stream end'] - direct['floor']:+.2f} ms to the stream's end (target: "
        "within 1.5 ms; the proxy hop is the same for every runner).",
        "",
        "| through the proxy (API test server, warm pool) | p50 (ms) |",
        "|---|---:|",
        *(f"| {name} | {value:.2f} |" for name, value in proxied.items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200)
    runs = parser.parse_args().runs
    binary = supervisor_binary()
    direct = per_exec(binary, runs)
    with tempfile.TemporaryDirectory() as work:
        proxied = asyncio.run(through_proxy(binary, runs, Path(work)))
    print(render(binary.stat().st_size, direct, proxied, runs))


if __name__ == "__main__":
    main()
