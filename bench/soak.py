"""Soak: thousands of execs through one real proxy, checking that nothing leaks.

    python bench/soak.py                       # 5,000 sequential, 5,000 at 20 concurrent, 500 cancelled
    python bench/soak.py --quick               # 1,000 + 1,000 at 20 + 100 (the test suite runs this)
    python bench/soak.py --backend kubernetes  # through the Kubernetes API test server
    python bench/soak.py --json results.json

Every exec is checked (its exit code and both streams, byte for byte); cancelled execs are
dropped by the client while their command is printing, with a background child holding a pipe.
After each phase no process of the run may be left (on Kubernetes: nothing left under the API
test server either), the proxy may have no child, and every cancelled exec must be counted as
`client_gone`. The proxy's RSS and open fds are sampled at the start (after a warm-up), every
1,000 execs and at the end; "quiet" samples are taken with no request in flight and no client
connection open, so their fd counts compare exactly.
Exit status 1 if an exec failed, a process was left, an error was logged, or fds grew.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
SAMPLE_EVERY = 1000
CONCURRENCY = 20
WARM_UP = 20
SPAWNER = "session_proxy.backends.spawner"
# An exec prints a line on each stream and exits with a code that depends on its number.
EXEC_SCRIPT = 'echo "out $1"; echo "err $1" >&2; exit $(($1 % 7))'
# A cancelled exec: a background child holding the pipes, and output that never stops.
STREAMING_SCRIPT = 'sleep "$0" & while :; do echo "tick $0"; sleep 0.01; done'


@dataclass
class Plan:
    sequential: int = 5000
    concurrent: int = 5000
    cancelled: int = 500

    @classmethod
    def quick(cls) -> Plan:
        return cls(sequential=1000, concurrent=1000, cancelled=100)


@dataclass
class Sample:
    point: str
    execs: int
    rss_mb: float
    fds: int
    children: int
    quiet: bool


@dataclass
class Results:
    plan: Plan
    marker: str
    backend: str = "local"
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    client_gone: float = 0
    in_flight: float = 0
    log_levels: dict[str, int] = field(default_factory=dict)
    log_errors: list[str] = field(default_factory=list)
    slot_waits: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    done: int = 0

    @property
    def start(self) -> Sample:
        return next(s for s in self.samples if s.point == "start")

    @property
    def end(self) -> Sample:
        return next(s for s in self.samples if s.point == "end")

    def summary(self) -> dict[str, Any]:
        return {
            "errors": len(self.failures),
            "leftover_processes": len(self.leftovers),
            "fds_start": self.start.fds,
            "fds_end": self.end.fds,
            "rss_start_mb": self.start.rss_mb,
            "rss_end_mb": self.end.rss_mb,
            "rss_peak_mb": max(s.rss_mb for s in self.samples),
            "rss_ratio": self.end.rss_mb / self.start.rss_mb,
            "client_gone": self.client_gone,
            "error_log_lines": sum(
                n for level, n in self.log_levels.items() if level in ("error", "critical")
            ),
        }

    def ok(self) -> bool:
        summary = self.summary()
        return (
            summary["errors"] == 0
            and summary["leftover_processes"] == 0
            and summary["fds_end"] == summary["fds_start"]
            and summary["error_log_lines"] == 0
            and self.client_gone == self.plan.cancelled
            and self.in_flight == 0
        )


def wait_for_line(process: subprocess.Popen[bytes], log: Path, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + 30
    while not (match := re.search(pattern, log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args} did not start: {log.read_text()}")
        time.sleep(0.02)
    return match


class Workspace:
    """Where the commands run: this machine (local backend) or the Kubernetes API test server."""

    def __init__(self, work: Path, backend: str) -> None:
        self.backend = backend
        self.server: subprocess.Popen[bytes] | None = None
        self.flags = ["--backend", "local", "--local-root", str(work)]
        if backend == "kubernetes":
            log = work / "kube-api.log"
            with log.open("wb") as file:
                self.server = subprocess.Popen(
                    [sys.executable, "-m", "tests.kube_api_server", "--dir", str(work / "kube")],
                    stdout=file, stderr=subprocess.STDOUT, cwd=ROOT,
                )  # fmt: skip
            kubeconfig = wait_for_line(self.server, log, r"kubeconfig: (\S+)").group(1)
            self.flags = ["--backend", "kubernetes", "--kubeconfig", kubeconfig, "--session-name", "demo"]

    def processes(self) -> list[psutil.Process]:
        """What still runs in the workspace (the test server's descendants); none when local."""
        return psutil.Process(self.server.pid).children(recursive=True) if self.server else []

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(timeout=30)


class Proxy:
    """`session-proxy serve` as its own process, logging to a file."""

    def __init__(self, work: Path, workspace: Workspace) -> None:
        self.log = work / "proxy.log"
        command = [
            sys.executable, "-m", "session_proxy", "serve", *workspace.flags,
            "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0",
            "--rate-limit", "0", "--max-concurrent", str(CONCURRENCY * 2), "--kill-grace", "2",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stderr=log, stdout=subprocess.DEVNULL, cwd=ROOT)
        self.ps = psutil.Process(self.process.pid)
        match = wait_for_line(self.process, self.log, r'"exec_url": "([^"]+)", "ops_url": "([^"]+)"')
        self.url, self.ops_url = match.group(1), match.group(2)
        self.ports = {int(self.url.rsplit(":", 1)[1]), int(self.ops_url.rsplit(":", 1)[1])}

    def sample(self, point: str, execs: int, *, quiet: bool, workspace_processes: int) -> Sample:
        return Sample(
            point=point,
            execs=execs,
            rss_mb=self.ps.memory_info().rss / MiB,
            fds=self.ps.num_fds(),
            children=len(self.command_processes()) + workspace_processes,
            quiet=quiet,
        )

    def command_processes(self) -> list[psutil.Process]:
        """The proxy's descendants, except its local backend's spawner (a helper it keeps for
        its whole life); the spawner's own children (a leader per command) do count."""
        found = []
        for process in self.ps.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.ppid() == self.ps.pid and SPAWNER in " ".join(process.cmdline()):
                    continue
                found.append(process)
        return found

    def no_clients(self) -> bool:
        """No connection open on either listener (its own connections to an API server may stay)."""
        return all(
            c.status == psutil.CONN_LISTEN or c.laddr.port not in self.ports
            for c in self.ps.net_connections("inet")
        )

    def log_levels(self) -> tuple[dict[str, int], list[str]]:
        """Lines per level, and the first lines above info (with their tracebacks)."""
        levels: dict[str, int] = {}
        notable = []
        for line in self.log.read_text().splitlines():
            level = json.loads(line).get("level", "?") if line.startswith("{") else "unparsed"
            levels[level] = levels.get(level, 0) + 1
            if level not in ("info", "debug") and len(notable) < 20:
                notable.append(line[:4000])
        return levels, notable

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(
                process.info["cmdline"] or []
            ):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


async def one_exec(http: aiohttp.ClientSession, url: str, marker: str, number: int) -> str | None:
    """Run exec ``number``; None if everything about it was right, else what was wrong."""
    body = {"command": ["sh", "-c", EXEC_SCRIPT, marker, str(number)], "timeout": 60}
    try:
        async with http.post(f"{url}/exec", json=body) as response:
            text = await response.text()
            if response.status != 200:
                return f"exec {number}: HTTP {response.status} {text[:200]}"
    except (TimeoutError, aiohttp.ClientError) as error:
        return f"exec {number}: {error!r}"
    events = [json.loads(line) for line in text.splitlines()]
    streams = {
        name: "".join(e.get("data", "") for e in events if e["type"] == name) for name in ("stdout", "stderr")
    }
    exits = [e for e in events if e["type"] == "exit"]
    got = (events[0]["type"], len(exits), events[-1]["type"], streams["stdout"], streams["stderr"])
    want = ("start", 1, "exit", f"out {number}\n", f"err {number}\n")
    if got != want:
        return f"exec {number}: events {got} instead of {want}; exit {exits[-1] if exits else None}"
    if (exits[0]["reason"], exits[0]["exit_code"]) != ("exited", number % 7):
        return f"exec {number}: ended {exits[0]}"
    return None


async def one_cancelled(
    http: aiohttp.ClientSession, url: str, marker: str, number: int, on_full: Callable[[], None]
) -> str | None:
    """Start a streaming exec, read until its output flows, then hang up.

    Dropped execs hold their slot until their command is gone, so a client dropping them back
    to back can meet the concurrency cap: like a polite client it then waits for a slot.
    """
    body = {"command": ["sh", "-c", STREAMING_SCRIPT, marker], "timeout": 600}
    deadline = time.monotonic() + 60
    while True:
        try:
            response = await http.post(f"{url}/exec", json=body)
        except (TimeoutError, aiohttp.ClientError) as error:
            return f"cancelled {number}: {error!r}"
        if response.status != 429 or time.monotonic() > deadline:
            break
        text = await response.text()
        response.close()
        if '"concurrency_limit"' not in text:
            return f"cancelled {number}: HTTP 429 {text[:200]}"
        on_full()
        await asyncio.sleep(0.05)
    try:
        if response.status != 200:
            return f"cancelled {number}: HTTP {response.status} {(await response.text())[:200]}"
        first = json.loads(await response.content.readline())
        second = json.loads(await response.content.readline())
        if (first["type"], second["type"]) != ("start", "stdout"):
            return f"cancelled {number}: began with {first} {second}"
        return None
    finally:
        response.close()  # drop the connection mid-stream


class Soak:
    def __init__(
        self, proxy: Proxy, workspace: Workspace, results: Results, progress: Callable[[str], None]
    ) -> None:
        self.proxy = proxy
        self.workspace = workspace
        self.results = results
        self.progress = progress
        self.gone_in_warm_up = 0.0
        self.phase = "warm-up"

    def _count(self, failure: str | None) -> None:
        results = self.results
        results.done += 1
        if failure is not None:
            results.failures.append(failure)
        if results.done % SAMPLE_EVERY == 0:
            sample = self.sample(f"during {self.phase}", quiet=False)
            results.samples.append(sample)
            self.progress(f"{results.done} execs: RSS {sample.rss_mb:.1f} MB, {sample.fds} fds")

    async def run(self) -> None:
        plan, marker = self.results.plan, self.results.marker
        await self._phase("warm-up", lambda http, n: one_exec(http, self.proxy.url, marker, n), WARM_UP, 1)
        await self._phase(
            "warm-up", lambda http, n: one_cancelled(http, self.proxy.url, marker, n, self._slot_full), 2, 1
        )
        self.results.done = 0
        self.gone_in_warm_up = self.results.client_gone
        self.results.samples.append(self.sample("start", quiet=True))
        await self._phase(
            "sequential", lambda http, n: one_exec(http, self.proxy.url, marker, n), plan.sequential, 1
        )
        await self._phase(
            "concurrent",
            lambda http, n: one_exec(http, self.proxy.url, marker, n),
            plan.concurrent,
            CONCURRENCY,
        )
        await self._phase(
            "cancelled",
            lambda http, n: one_cancelled(http, self.proxy.url, marker, n, self._slot_full),
            plan.cancelled,
            1,
        )

    async def _phase(
        self,
        name: str,
        one: Callable[[aiohttp.ClientSession, int], Awaitable[str | None]],
        count: int,
        concurrency: int,
    ) -> None:
        started = time.monotonic()
        numbers = iter(range(count))
        self.phase = name
        counting = name != "warm-up"

        async def worker(http: aiohttp.ClientSession) -> None:
            for number in numbers:
                failure = await one(http, number)
                if counting:
                    self._count(failure)
                elif failure:
                    self.results.failures.append(f"warm-up: {failure}")

        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        await self._settle(name)
        if counting:
            self.results.seconds[name] = round(time.monotonic() - started, 1)
            point = "end" if name == "cancelled" else f"after {name}"
            self.results.samples.append(self.sample(point, quiet=True))

    async def _settle(self, phase: str) -> None:
        """Wait (bounded) until every command of the run is gone and every exec is recorded."""
        results, marker = self.results, self.results.marker
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = await self._metrics()
            busy = metrics.get("session_proxy_exec_in_flight", 0) > 0
            if not (processes_with(marker) or self.remaining()) and not busy:
                break
            await asyncio.sleep(0.05)
        left = processes_with(marker) + self.remaining()
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                command = " ".join(process.cmdline())[:120]
                process.kill()
                results.leftovers.append(f"after {phase}: pid {process.pid} {command}")
        metrics = await self._metrics()
        gone = metrics.get('session_proxy_exec_requests_total{outcome="client_gone"}', 0)
        results.client_gone = gone - self.gone_in_warm_up
        results.in_flight = metrics.get("session_proxy_exec_in_flight", 0)
        while time.monotonic() < deadline + 10 and not self.proxy.no_clients():
            await asyncio.sleep(0.05)  # connections the client closed, not yet closed by the proxy
        # Pipes are closed just after a command's group is gone: give that a moment, bounded.
        start = next((s for s in results.samples if s.point == "start"), None)
        settled = time.monotonic() + 5
        while start and self.proxy.ps.num_fds() > start.fds and time.monotonic() < settled:
            await asyncio.sleep(0.05)

    def _slot_full(self) -> None:
        self.results.slot_waits += 1

    def sample(self, point: str, *, quiet: bool) -> Sample:
        processes = len(self.workspace.processes())
        return self.proxy.sample(point, self.results.done, quiet=quiet, workspace_processes=processes)

    def remaining(self) -> list[psutil.Process]:
        """The proxy's children and whatever still runs in the workspace."""
        return self.proxy.command_processes() + self.workspace.processes()

    async def _metrics(self) -> dict[str, float]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.proxy.ops_url}/metrics") as response:
            text = await response.text()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def render(results: Results) -> str:
    summary = results.summary()
    plan = results.plan
    lines = [
        f"Run on {date.today().isoformat()}, {psutil.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.machine()}; `python bench/soak.py{' --quick' if plan == Plan.quick() else ''}"
        f"{' --backend kubernetes' if results.backend == 'kubernetes' else ''}` "
        f"(one proxy process on the {results.backend} backend).",
        "",
        f"{plan.sequential:,} execs one after another ({results.seconds.get('sequential', 0)} s), "
        f"{plan.concurrent:,} at {CONCURRENCY} concurrent ({results.seconds.get('concurrent', 0)} s), "
        f"{plan.cancelled:,} dropped by the client mid-stream ({results.seconds.get('cancelled', 0)} s).",
        "",
        'Samples "during" a phase count its open client connections and running commands; the',
        "others are quiet (nothing in flight, every client connection closed) and compare exactly.",
        "",
        "| point | execs | proxy RSS MB | proxy open fds | proxy children + workspace processes |",
        "|---|---|---|---|---|",
    ]
    for sample in results.samples:
        lines.append(
            f"| {sample.point} | {sample.execs:,} | {sample.rss_mb:.1f} | {sample.fds} | {sample.children} |"
        )
    lines += [
        "",
        "| check | result |",
        "|---|---|",
        f"| failed execs (wrong exit code or output, HTTP error) | {summary['errors']} |",
        f"| processes left after the run (command groups, background children) | {summary['leftover_processes']} |",
        f"| cancelled execs counted as `client_gone` | {summary['client_gone']:.0f} of {plan.cancelled} |",
        f"| 429 `concurrency_limit` met while dropping execs (then waited for a slot) | {results.slot_waits} |",
        f"| open fds, start → end (quiet) | {summary['fds_start']} → {summary['fds_end']} |",
        f"| RSS, start → end (peak) | {summary['rss_start_mb']:.1f} → {summary['rss_end_mb']:.1f} MB "
        f"(× {summary['rss_ratio']:.2f}; peak {summary['rss_peak_mb']:.1f} MB) |",
        f"| error lines in the proxy's log | {summary['error_log_lines']} |",
    ]
    return "\n".join(lines)


async def soak(plan: Plan, backend: str, progress: Callable[[str], None]) -> Results:
    work = Path(tempfile.mkdtemp(prefix="session-proxy-soak-"))
    results = Results(plan=plan, marker=f"3600.{secrets.randbelow(10**9):09d}", backend=backend)
    workspace = Workspace(work, backend)
    try:
        proxy = Proxy(work, workspace)
    except Exception:
        workspace.stop()
        raise
    try:
        await Soak(proxy, workspace, results, progress).run()
    finally:
        code = proxy.stop()
        workspace.stop()
        results.log_levels, results.log_errors = proxy.log_levels()
        if code != 0:
            results.failures.append(f"the proxy exited {code} on SIGTERM")
        for process in processes_with(results.marker):
            results.leftovers.append(f"after stop: pid {process.pid}")
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1,000 + 1,000 + 100 execs instead of 5,000 + 5,000 + 500"
    )
    parser.add_argument(
        "--backend",
        choices=["local", "kubernetes"],
        default="local",
        help="kubernetes: through the Kubernetes API test server (tests/kube_api_server.py)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    plan = Plan.quick() if arguments.quick else Plan()
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = asyncio.run(soak(plan, arguments.backend, progress))
    print(render(results))
    for failure in (results.failures + results.leftovers + results.log_errors)[:20]:
        print(f"  {failure}", file=sys.stderr)
    if arguments.json:
        arguments.json.write_text(
            json.dumps({**asdict(results), "summary": results.summary(), "ok": results.ok()}, indent=1)
        )
    sys.exit(0 if results.ok() else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    main()
