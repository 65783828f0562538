"""What the MCP SDK costs the proxy: idle RSS and start-up, with the SDK loaded at start vs on first use.

    python bench/mcp_footprint.py [--runs 5]

Each run starts a proxy process on the local backend, times it to ``/readyz`` 200, reads its RSS
once ready, then (lazy mode) times the first ``/mcp`` request, which loads the SDK, and reads
the RSS again. The "loaded at start" mode imports the SDK before the proxy starts, which is what
an eager import in the app would cost. Runs alternate between the modes on the same machine;
medians are reported, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

MiB = 1024 * 1024
# What /mcp loads on first use (the SDK's server side), loaded before the proxy starts instead.
EAGER = ("from session_proxy.mcp.sdk import import_server_side; "
         "import_server_side('session_proxy.mcp.tools', 'mcp.server.streamable_http_manager'); ")  # fmt: skip
INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "b", "version": "0"}},
}  # fmt: skip


def serve(work: Path, prelude: str, log: Path) -> subprocess.Popen[bytes]:
    code = f"{prelude}import sys; from session_proxy.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "serve", "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0",
               "--backend", "local", "--local-root", str(work)]  # fmt: skip
    with log.open("wb") as file:
        return subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen[bytes], log: Path) -> tuple[str, str]:
    deadline = time.monotonic() + 60
    while not (match := re.search(r'"exec_url": "([^"]+)", "ops_url": "([^"]+)"', log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text())
        time.sleep(0.002)
    exec_url, ops_url = match.group(1), match.group(2)
    while True:
        try:
            with urllib.request.urlopen(f"{ops_url}/readyz") as response:
                if response.status == 200:
                    return exec_url, ops_url
        except OSError:
            time.sleep(0.002)


def first_mcp_request(exec_url: str) -> None:
    request = urllib.request.Request(
        f"{exec_url}/mcp",
        data=json.dumps(INITIALIZE).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
    )
    with urllib.request.urlopen(request) as response:
        response.read(1)


def one_run(work: Path, eager: bool) -> dict[str, float]:
    log = work / f"proxy-{time.monotonic_ns()}.log"
    started = time.monotonic()
    process = serve(work, EAGER if eager else "", log)
    try:
        exec_url, _ = wait_ready(process, log)
        figures = {"startup_ms": (time.monotonic() - started) * 1000}
        time.sleep(0.5)  # let start-up garbage settle
        figures["idle_rss_mb"] = psutil.Process(process.pid).memory_info().rss / MiB
        if not eager:
            before = time.monotonic()
            first_mcp_request(exec_url)
            figures["first_mcp_ms"] = (time.monotonic() - before) * 1000
            time.sleep(0.5)
            figures["rss_after_mcp_mb"] = psutil.Process(process.pid).memory_info().rss / MiB
        return figures
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(runs):
            for eager in (False, True):
                results[eager].append(one_run(Path(directory), eager))

    def median(eager: bool, key: str) -> float:
        return statistics.median(run[key] for run in results[eager])

    lazy_start, eager_start = median(False, "startup_ms"), median(True, "startup_ms")
    lazy_rss, eager_rss = median(False, "idle_rss_mb"), median(True, "idle_rss_mb")
    print(f"| proxy, local backend (median of {runs}) | SDK on first use (default) | SDK loaded at start |")
    print("|---|---|---|")
    print(
        f"| start-up to /readyz 200 | {lazy_start:.0f} ms | {eager_start:.0f} ms ({eager_start / lazy_start:.2f}×) |"
    )
    print(
        f"| idle RSS, no MCP client | {lazy_rss:.0f} MB | {eager_rss:.0f} MB (+{eager_rss - lazy_rss:.0f} MB) |"
    )
    print(f"| first /mcp request (loads the SDK) | {median(False, 'first_mcp_ms'):.0f} ms | |")
    print(f"| RSS after the first /mcp request | {median(False, 'rss_after_mcp_mb'):.0f} MB | |")


if __name__ == "__main__":
    main()
