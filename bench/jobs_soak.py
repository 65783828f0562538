"""Soak: thousands of background jobs through one real proxy, checking that memory stays flat.

    python bench/jobs_soak.py            # 3,000 jobs, 8 at a time (the cap), each overflowing its ring
    python bench/jobs_soak.py --quick    # 400 jobs (the test suite runs this)
    python bench/jobs_soak.py --json results.json

Each job prints 200 KiB to stdout (three times its 64 KiB ring) and a line to stderr; one read
after its end must get a `lost` event for exactly the bytes that fell out, then exactly the last
64 KiB, and the exit event. Ended jobs are kept for an hour, so only the keep bound (four times
--max-jobs) stops them piling up. The proxy's RSS is sampled after a warm-up and every 500 jobs.
Exit status 1 if a job's output or exit was wrong, more ended jobs were kept than the bound, a
process was left, or RSS grew by more than 32 MiB after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
RING = 64 * 1024
MAX_JOBS = 8
LINE = 1024  # bytes per printed line
LINES = 200  # 200 KiB of stdout per job
SAMPLE_EVERY = 500
WARM_UP = 100
RSS_GROWTH_LIMIT = 32 * MiB
SCRIPT = (
    f'i=0; while [ $i -lt {LINES} ]; do printf "%0{LINE - 1}d\\n" $i; i=$((i+1)); done; echo "err $0" >&2'
)
EXPECTED = b"".join(b"%0*d\n" % (LINE - 1, i) for i in range(LINES))


def start_proxy(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = root / "proxy.log"
    command = [
        sys.executable, "-m", "session_proxy", "serve", "--backend", "local", "--local-root", str(root),
        "--listen", "127.0.0.1:0", "--ops-listen", "", "--rate-limit", "0", "--max-jobs", str(MAX_JOBS),
        "--job-output-bytes", str(RING), "--job-retention", "3600", "--kill-grace", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=log.open("wb"), stdout=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (match := re.search(rb'"exec_url": "([^"]+)"', log.read_bytes())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the proxy did not start: {log.read_text()}")
        time.sleep(0.05)
    return process, match.group(1).decode()


async def run_job(http: aiohttp.ClientSession, url: str, number: int) -> str | None:
    """One job start to end, checked; a description of what was wrong, or None."""
    while True:
        async with http.post(f"{url}/jobs", json={"command": ["sh", "-c", SCRIPT, str(number)]}) as response:
            if response.status == 429:  # the cap: another worker's job is still ending
                await asyncio.sleep(0.01)
                continue
            if response.status != 201:
                return f"job {number}: {response.status} {await response.text()}"
            job_id = (await response.json())["job_id"]
            break
    async with http.get(f"{url}/jobs/{job_id}/output", params={"follow": "true"}) as response:
        events = [json.loads(line) for line in (await response.read()).splitlines()]
    stdout = b"".join(
        base64.b64decode(e["data_b64"]) if "data_b64" in e else e["data"].encode()
        for e in events
        if e["type"] == "stdout"
    )
    lost = sum(e["bytes"] for e in events if e["type"] == "lost" and e["stream"] == "stdout")
    exits = [e for e in events if e["type"] == "exit"]
    if len(exits) != 1 or exits[0]["exit_code"] != 0:
        return f"job {number}: exit {exits}"
    # Read while it ran, the job may have lost fewer bytes; what was read plus what was lost is all.
    if lost + len(stdout) != len(EXPECTED) or not EXPECTED.endswith(stdout[-RING:]):
        return f"job {number}: {lost} lost + {len(stdout)} read != {len(EXPECTED)}"
    return None


async def soak(total: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="jobs-soak-"))
    process, url = start_proxy(root)
    proxy = psutil.Process(process.pid)
    samples: list[tuple[int, int]] = []
    problems: list[str] = []
    done = 0
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            queue = iter(range(total))

            async def worker() -> None:
                nonlocal done
                for number in queue:
                    problem = await run_job(http, url, number)
                    if problem:
                        problems.append(problem)
                    done += 1
                    if done == WARM_UP or done % SAMPLE_EVERY == 0:
                        samples.append((done, proxy.memory_info().rss))

            await asyncio.gather(*(worker() for _ in range(MAX_JOBS)))
            samples.append((done, proxy.memory_info().rss))
            async with http.get(f"{url}/jobs") as response:
                kept = len((await response.json())["jobs"])
        if kept > 4 * MAX_JOBS:
            problems.append(f"{kept} jobs kept, more than {4 * MAX_JOBS}")
        leftovers = []
        for child in proxy.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile: not left
                if "spawner" not in " ".join(child.cmdline()):
                    leftovers.append(child)
        if leftovers:
            problems.append(f"processes left: {leftovers}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    warm = next(rss for count, rss in samples if count >= WARM_UP)
    growth = samples[-1][1] - warm
    if growth > RSS_GROWTH_LIMIT:
        problems.append(f"RSS grew by {growth / MiB:.1f} MiB after the warm-up")
    return {
        "jobs": total,
        "seconds": round(time.monotonic() - started, 1),
        "kept_at_end": kept,
        "rss_mib": [(count, round(rss / MiB, 1)) for count, rss in samples],
        "rss_growth_after_warm_up_mib": round(growth / MiB, 1),
        "problems": problems[:20],
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="400 jobs")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--json", type=Path, help="write the results here too")
    flags = parser.parse_args()
    result = asyncio.run(soak(400 if flags.quick else flags.jobs))
    print(json.dumps(result, indent=2))
    if flags.json:
        flags.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
