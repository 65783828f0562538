"""Side-by-side benchmarks: session-proxy against the alternatives a user has, in one run.

    python bench/run.py                  # full run, prints the markdown table
    python bench/run.py --quick          # tiny sizes, for a smoke test
    python bench/run.py --out BENCHMARKS.md   # rewrites only its own sections of the file

Contenders, all against the same Kubernetes API test server (tests/kube_api_server.py, TLS,
real processes) on loopback:
  proxy-kube    POST /exec to session-proxy on the kubernetes backend (warm)
  kubectl       the real `kubectl exec` binary, one process per command
  direct-ws     an in-process kubernetes_asyncio WebSocket exec, no proxy hop (the floor)
  proxy-local   POST /exec to session-proxy on the local backend
  subprocess    a bare local asyncio subprocess (the floor without Kubernetes)
Nothing here asserts a time; it measures and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import psutil
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
POD = "workspace-demo"


@dataclass
class Sizes:
    latency_runs: int = 200
    throughput_bytes: int = 512 * MiB
    concurrency: tuple[int, ...] = (1, 10, 50, 100)
    per_stream_bytes: int = 1 * MiB
    startups: int = 5
    warm_runs: int = 100
    warm_levels: tuple[int, ...] = (1, 10)
    idle_seconds: float = 600

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            latency_runs=3,
            throughput_bytes=2 * MiB,
            concurrency=(1, 2),
            per_stream_bytes=64 * 1024,
            startups=1,
            warm_runs=2,
            warm_levels=(1, 2),
            idle_seconds=1,
        )


@dataclass
class Results:
    latency: dict[str, list[float]] = field(default_factory=dict)
    first_byte: dict[str, list[float]] = field(default_factory=dict)
    throughput: dict[str, dict[str, float]] = field(default_factory=dict)
    concurrency: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    footprint: dict[str, float] = field(default_factory=dict)


# ---- processes -------------------------------------------------------------------------------


class Spawned:
    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as file:
            self.process = subprocess.Popen(
                command, stdout=file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self.ps = psutil.Process(self.process.pid)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.log.read_text(errors="replace")):
                return match
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.process.args} exited: {self.log.read_text()}")
            time.sleep(0.01)
        raise TimeoutError(f"{pattern!r} not seen in {self.log}")

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_proxy(work: Path, name: str, *flags: str) -> tuple[Spawned, str, str, float]:
    """A session-proxy process; returns it, its URLs and the seconds until /readyz said 200."""
    started = time.monotonic()
    proxy = Spawned(
        [sys.executable, "-m", "session_proxy", "serve", "--listen", "127.0.0.1:0",
         "--ops-listen", "127.0.0.1:0", "--max-concurrent", "200", "--rate-limit", "0",
         "--max-output-bytes", str(8 * 1024 * MiB), "--local-root", str(work), *flags],
        work / f"{name}.log",
    )  # fmt: skip
    match = proxy.wait_for(r'"exec_url": "([^"]+)", "ops_url": "([^"]+)"')
    exec_url, ops_url = match.group(1), match.group(2)
    while True:
        try:
            with contextlib.closing(__import__("urllib.request").request.urlopen(f"{ops_url}/readyz")) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.005)
    return proxy, exec_url, ops_url, time.monotonic() - started


# ---- contenders ------------------------------------------------------------------------------

Runner = Callable[[list[str], Callable[[bytes], None] | None], Awaitable[None]]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Contenders:
    def __init__(self, kubeconfig: Path, work: Path, proxy_kube: str, proxy_local: str) -> None:
        self.kubeconfig = kubeconfig
        self.work = work
        self.urls = {"proxy-kube": proxy_kube, "proxy-local": proxy_local}
        self.http: aiohttp.ClientSession | None = None
        self.api: kube_client.ApiClient | None = None
        self.configuration: kube_client.Configuration | None = None

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Contenders]:
        configuration = kube_client.Configuration()
        await kube_config.load_kube_config(
            config_file=str(self.kubeconfig), client_configuration=configuration
        )
        configuration.connection_pool_maxsize = 400
        self.configuration = configuration
        self.api = kube_client.ApiClient(configuration)
        connector = aiohttp.TCPConnector(limit=0)
        self.http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        try:
            yield self
        finally:
            await self.http.close()
            await self.api.close()

    def runner(self, name: str) -> Runner:
        return {
            "proxy-kube": lambda argv, sink: self.via_proxy("proxy-kube", argv, sink),
            "proxy-local": lambda argv, sink: self.via_proxy("proxy-local", argv, sink),
            "direct-ws": self.via_websocket,
            "direct-ws+wrapper": self.via_websocket_wrapped,
            "kubectl": self.via_kubectl,
            "subprocess": self.via_subprocess,
        }[name]

    async def via_proxy(self, name: str, argv: list[str], sink: Callable[[bytes], None] | None) -> None:
        assert self.http is not None
        async with self.http.post(
            f"{self.urls[name]}/exec", json={"command": argv, "timeout": 1800}
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"{name}: HTTP {response.status} {await response.text()}")
            buffer = b""
            async for data in response.content.iter_any():
                if sink is not None:
                    sink(data)
                buffer = (buffer + data)[-400:]
            if b'"reason":"exited"' not in buffer:
                raise RuntimeError(f"{name}: did not end normally: {buffer[-300:]!r}")

    async def via_proxy_url(self, url: str, argv: list[str]) -> None:
        assert self.http is not None
        async with self.http.post(f"{url}/exec", json={"command": argv}) as response:
            await response.read()

    async def via_websocket(self, argv: list[str], sink: Callable[[bytes], None] | None) -> None:
        assert self.api is not None
        assert self.configuration is not None
        query = urlencode([("command", a) for a in argv] + [("container", "workspace"),
                                                             ("stdout", "true"), ("stderr", "true")], quote_via=quote)  # fmt: skip
        url = f"{self.configuration.host}/api/v1/namespaces/default/pods/{POD}/exec?{query}"
        token = await self.configuration.get_api_key_with_prefix("BearerToken")
        session: aiohttp.ClientSession = self.api.rest_client.pool_manager
        async with session.ws_connect(url, protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"),
                                      headers={"Authorization": token}, max_msg_size=0) as ws:  # fmt: skip
            status = b""
            async for message in ws:
                data = message.data
                if len(data) > 1 and data[0] in (1, 2) and sink is not None:
                    sink(data[1:])
                elif len(data) > 1 and data[0] == 3:
                    status += data[1:]
            if b"Success" not in status:
                raise RuntimeError(f"direct-ws: {status!r}")

    async def via_websocket_wrapped(self, argv: list[str], sink: Callable[[bytes], None] | None) -> None:
        """The proxy's exec (constant wrapper argv, inputs over stdin) without the proxy hop."""
        from session_proxy.backends.kubernetes.wrapper import SHELL, WRAPPER_SCRIPT, encode_header, new_nonce

        assert self.api is not None
        assert self.configuration is not None
        nonce = new_nonce()
        header = encode_header(
            nonce=nonce, argv=argv, workdir=None, env={}, stdin_length=0, deadline=60, grace=1
        )
        query = urlencode([("command", a) for a in (SHELL, "-c", WRAPPER_SCRIPT)] + [
            ("container", "workspace"), ("stdin", "true"), ("stdout", "true"), ("stderr", "true")])  # fmt: skip
        url = f"{self.configuration.host}/api/v1/namespaces/default/pods/{POD}/exec?{query}"
        token = await self.configuration.get_api_key_with_prefix("BearerToken")
        session: aiohttp.ClientSession = self.api.rest_client.pool_manager
        exit_marker = f"SP{nonce}:exit:".encode()
        stderr = b""
        async with session.ws_connect(url, protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"),
                                      headers={"Authorization": token}, max_msg_size=0) as ws:  # fmt: skip
            await ws.send_bytes(b"\x00" + header)
            async for message in ws:
                data = message.data
                if len(data) > 1 and data[0] == 1 and sink is not None:
                    sink(data[1:])
                elif len(data) > 1 and data[0] == 2:
                    stderr += data[1:]
            # stdout and stderr are separate streams: stdout written before the exit can come
            # after the exit marker, so the stream is read to its end, not to the marker.
            if exit_marker not in stderr:
                raise RuntimeError("direct-ws+wrapper: the stream ended without the exit marker")

    async def via_kubectl(self, argv: list[str], sink: Callable[[bytes], None] | None) -> None:
        process = await asyncio.create_subprocess_exec(
            "kubectl", "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.work / "kcache"),
            "exec", POD, "-c", "workspace", "--", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert process.stdout is not None
        while data := await process.stdout.read(256 * 1024):
            if sink is not None:
                sink(data)
        if await process.wait() != 0:
            raise RuntimeError("kubectl exec failed")

    async def via_subprocess(self, argv: list[str], sink: Callable[[bytes], None] | None) -> None:
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        assert process.stdout is not None
        while data := await process.stdout.read(256 * 1024):
            if sink is not None:
                sink(data)
        await process.wait()


KUBE = ("proxy-kube", "kubectl", "direct-ws", "direct-ws+wrapper")
LOCAL = ("proxy-local", "subprocess")
ALL = (*KUBE, *LOCAL)
THROUGHPUT = ("proxy-kube", "kubectl", "direct-ws", "proxy-local", "subprocess")


# ---- measurements ----------------------------------------------------------------------------


async def measure_latency(contenders: Contenders, sizes: Sizes, results: Results) -> None:
    for name in ALL:
        run = contenders.runner(name)
        for _ in range(3):
            await run(["true"], None)  # warm: connections, discovery cache, image probe
        durations, first = [], []
        for _ in range(sizes.latency_runs):
            started = time.perf_counter()
            await run(["true"], None)
            durations.append(time.perf_counter() - started)
        for _ in range(max(3, sizes.latency_runs // 4)):
            first.append(await time_to_first_byte(run))
        results.latency[name], results.first_byte[name] = durations, first


async def time_to_first_byte(run: Runner) -> float:
    started = time.perf_counter()
    seen: list[float] = []

    def sink(data: bytes) -> None:
        if not seen and b"ttfb" in data:
            seen.append(time.perf_counter() - started)

    await run(["echo", "ttfb"], sink)
    return seen[0]


async def measure_throughput(
    contenders: Contenders, sizes: Sizes, results: Results, proxies: dict[str, Spawned]
) -> None:
    payloads = {"text": contenders.work / "payload.txt", "binary": contenders.work / "payload.bin"}
    for kind, path in payloads.items():
        for name in THROUGHPUT:
            received = [0]

            def sink(data: bytes, received: list[int] = received) -> None:
                received[0] += len(data)

            proxy = proxies.get(name)
            cpu_before = proxy.cpu_seconds() if proxy else 0.0
            started = time.perf_counter()
            await contenders.runner(name)(["cat", str(path)], sink)
            elapsed = time.perf_counter() - started
            row = results.throughput.setdefault(f"{name}/{kind}", {})
            row["mb_s"] = path.stat().st_size / MiB / elapsed
            row["wire_mb"] = received[0] / MiB
            if proxy:
                row["cpu_s_per_gb"] = (proxy.cpu_seconds() - cpu_before) / (path.stat().st_size / 1024**3)


async def measure_concurrency(
    contenders: Contenders, sizes: Sizes, results: Results, proxies: dict[str, Spawned]
) -> None:
    chunk = max(1, sizes.per_stream_bytes // 20)
    script = f"i=0; while [ $i -lt 20 ]; do head -c {chunk} {contenders.work / 'payload.txt'}; sleep 0.1; i=$((i+1)); done"
    for name in ("proxy-kube", "proxy-local", "direct-ws"):
        run = contenders.runner(name)
        proxy = proxies.get(name)
        for level in sizes.concurrency:
            cpu_before = proxy.cpu_seconds() if proxy else 0.0
            peak_rss = [proxy.ps.memory_info().rss if proxy else 0]
            durations: list[float] = []
            errors = [0]

            async def one(
                run: Runner = run, durations: list[float] = durations, errors: list[int] = errors
            ) -> None:
                started = time.perf_counter()
                try:
                    await run(["sh", "-c", script], None)
                    durations.append(time.perf_counter() - started)
                except Exception:
                    errors[0] += 1

            async def sample_rss(proxy: Spawned | None = proxy, peak: list[int] = peak_rss) -> None:
                while proxy:
                    peak[0] = max(peak[0], proxy.ps.memory_info().rss)
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample_rss())
            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(level)))
            wall = time.perf_counter() - started
            sampler.cancel()
            results.concurrency.setdefault(name, {})[level] = {
                "req_s": level / wall,
                "p50": percentile(durations, 0.5) if durations else float("nan"),
                "p99": percentile(durations, 0.99) if durations else float("nan"),
                "errors": errors[0],
                "cpu_ms_per_exec": (proxy.cpu_seconds() - cpu_before) / level * 1000
                if proxy
                else float("nan"),
                "peak_rss_mb": peak_rss[0] / MiB,
            }


async def measure_slow_reader(contenders: Contenders, results: Results, proxy: Spawned, url: str) -> None:
    """A reader that pauses, then reads slowly: how much does a fresh, warm proxy's memory grow?"""
    assert contenders.http is not None
    await contenders.via_proxy_url(url, ["true"])
    baseline = proxy.ps.memory_info().rss
    peak = baseline
    body = {"command": ["cat", str(contenders.work / "payload.txt")], "timeout": 1800}
    async with contenders.http.post(f"{url}/exec", json=body) as response:
        await response.content.readline()
        for _ in range(20):
            await asyncio.sleep(0.1)
            peak = max(peak, proxy.ps.memory_info().rss)
        async for _ in response.content.iter_chunked(256 * 1024):
            peak = max(peak, proxy.ps.memory_info().rss)
            await asyncio.sleep(0.001)
    results.footprint["slow_reader_growth_mb"] = (peak - baseline) / MiB
    results.footprint["slow_reader_baseline_mb"] = baseline / MiB


def make_payloads(work: Path, size: int) -> None:
    with (work / "payload.bin").open("wb") as binary:
        binary.write(os.urandom(size))
    raw = min(size, 48 * MiB)
    subprocess.run(
        f"head -c {raw * 3 // 4} /dev/urandom | base64 -w 76 > {work / 'one.txt'}", shell=True, check=True
    )
    with (work / "payload.txt").open("wb") as text:
        block = (work / "one.txt").read_bytes()
        written = 0
        while written < size:
            piece = block[: size - written]
            text.write(piece)
            written += len(piece)


# ---- report ----------------------------------------------------------------------------------


def render(results: Results, sizes: Sizes) -> str:
    cpu = psutil.cpu_count()
    lines = [
        "# Benchmarks",
        "",
        f"Run on {date.today().isoformat()}, {cpu} CPUs, Python {platform.python_version()}, "
        f"{platform.machine()}; `python bench/run.py` (all contenders in one run, same machine).",
        "The Kubernetes API test server (Python, TLS, real processes) stands in for a cluster: its own",
        "cost is in every Kubernetes figure, so compare ratios within a row set, not absolute numbers",
        "with a real cluster.",
        "",
        f"## Round trip of `true` (concurrency 1, {sizes.latency_runs} runs) and time to first byte",
        "",
        "| contender | p50 ms | p99 ms | × floor (p50) | first byte p50 ms | includes |",
        "|---|---|---|---|---|---|",
    ]
    includes = {
        "proxy-kube": "HTTP+JSON to the proxy, discovery (cached), wrapper shell, TLS WebSocket",
        "kubectl": "process start, kubeconfig, GET /version (dispatcher), pod GET, TLS WebSocket",
        "direct-ws": "TLS WebSocket, plain argv (no wrapper)",
        "direct-ws+wrapper": "TLS WebSocket running the proxy's wrapper script, no proxy hop",
        "proxy-local": "HTTP+JSON to the proxy, local process group",
        "subprocess": "fork/exec only",
    }
    floors = {"proxy-kube": "direct-ws", "kubectl": "direct-ws", "direct-ws": "direct-ws", "direct-ws+wrapper": "direct-ws",
              "proxy-local": "subprocess", "subprocess": "subprocess"}  # fmt: skip
    for name in ALL:
        durations = results.latency[name]
        floor = statistics.median(results.latency[floors[name]])
        lines.append(
            f"| {name} | {statistics.median(durations) * 1000:.1f} | {percentile(durations, 0.99) * 1000:.1f} "
            f"| {statistics.median(durations) / floor:.2f} | {statistics.median(results.first_byte[name]) * 1000:.1f} "
            f"| {includes[name]} |"
        )
    kube_p50 = statistics.median(results.latency["proxy-kube"])
    lines += [
        "",
        f"proxy-kube p50 / kubectl p50 = **{kube_p50 / statistics.median(results.latency['kubectl']):.2f}**; "
        f"proxy-kube p50 − direct-ws p50 = **{(kube_p50 - statistics.median(results.latency['direct-ws'])) * 1000:.1f} ms**, "
        f"of which the wrapper script (direct-ws+wrapper − direct-ws) is "
        f"**{(statistics.median(results.latency['direct-ws+wrapper']) - statistics.median(results.latency['direct-ws'])) * 1000:.1f} ms** "
        f"and the proxy hop (proxy-kube − direct-ws+wrapper) "
        f"**{(kube_p50 - statistics.median(results.latency['direct-ws+wrapper'])) * 1000:.1f} ms**.",
        "",
        f"## Streaming throughput ({sizes.throughput_bytes // MiB} MiB through `cat`)",
        "",
        "| contender | text MB/s | × direct-ws | binary MB/s | × direct-ws | proxy CPU s/GB (text) |",
        "|---|---|---|---|---|---|",
    ]
    for name in THROUGHPUT:
        text, binary = results.throughput[f"{name}/text"], results.throughput[f"{name}/binary"]
        ratio_t = text["mb_s"] / results.throughput["direct-ws/text"]["mb_s"]
        ratio_b = binary["mb_s"] / results.throughput["direct-ws/binary"]["mb_s"]
        cpu_gb = f"{text['cpu_s_per_gb']:.2f}" if "cpu_s_per_gb" in text else "—"
        lines.append(
            f"| {name} | {text['mb_s']:.0f} | {ratio_t:.2f} | {binary['mb_s']:.0f} | {ratio_b:.2f} | {cpu_gb} |"
        )
    lines += [
        "",
        "Text is base64 lines (so JSON escaping is not what is measured); binary is random bytes,",
        "which the proxy sends as base64 in JSON (`data_b64`), so its wire volume is 4/3 of the payload.",
        "",
        f"## Concurrency (each exec prints ~{sizes.per_stream_bytes // 1024} KiB over ~2 s)",
        "",
        "| contender | streams | execs/s | p50 s | p99 s | errors | proxy CPU ms/exec | proxy peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, levels in results.concurrency.items():
        for level, row in levels.items():
            lines.append(
                f"| {name} | {level} | {row['req_s']:.1f} | {row['p50']:.2f} | {row['p99']:.2f} | {row['errors']} "
                f"| {row['cpu_ms_per_exec']:.1f} | {row['peak_rss_mb']:.0f} |"
            )
    foot = results.footprint
    lines += [
        "",
        "## Footprint",
        "",
        "| measure | value |",
        "|---|---|",
        f"| idle RSS, kubernetes backend (after start) | {foot['idle_rss_kube_mb']:.0f} MB |",
        f"| idle RSS, local backend | {foot['idle_rss_local_mb']:.0f} MB |",
        f"| start-up to /readyz 200, kubernetes backend (median of {sizes.startups}) | {foot['startup_kube_s'] * 1000:.0f} ms |",
        f"| start-up to /readyz 200, local backend | {foot['startup_local_s'] * 1000:.0f} ms |",
        f"| RSS growth with a reader that pauses 2 s, then reads ({sizes.throughput_bytes // MiB} MiB stream, "
        f"fresh proxy at {foot['slow_reader_baseline_mb']:.0f} MB) | {foot['slow_reader_growth_mb']:.1f} MB |",
        f"| peak RSS, 100 concurrent streams (kubernetes backend) | "
        f"{results.concurrency.get('proxy-kube', {}).get(100, {}).get('peak_rss_mb', float('nan')):.0f} MB |",
        "",
    ]
    return "\n".join(lines)


def render_targets(results: Results) -> str:
    """The standing targets, each checked against this run's figures."""
    p50 = {name: statistics.median(durations) for name, durations in results.latency.items()}
    text = {name: results.throughput[f"{name}/text"]["mb_s"] for name in THROUGHPUT}
    levels = results.concurrency.get("proxy-kube", {})
    peak = max((row["peak_rss_mb"] for row in levels.values()), default=float("nan"))
    errors = sum(int(row["errors"]) for rows in results.concurrency.values() for row in rows.values())
    growth = results.footprint["slow_reader_growth_mb"]
    rows = [
        ("latency p50 <= 0.25 x `kubectl exec` (cold)", f"{p50['proxy-kube'] / p50['kubectl']:.2f} x "
         f"({p50['proxy-kube'] * 1000:.1f} ms vs {p50['kubectl'] * 1000:.1f} ms)", p50["proxy-kube"] <= 0.25 * p50["kubectl"]),
        ("latency p50 <= direct WebSocket + 5 ms (cold)", f"{(p50['proxy-kube'] - p50['direct-ws']) * 1000:+.1f} ms",
         p50["proxy-kube"] - p50["direct-ws"] <= 0.005),
        ("throughput >= 0.8 x direct WebSocket (text)", f"{text['proxy-kube'] / text['direct-ws']:.2f} x "
         f"({text['proxy-kube']:.0f} vs {text['direct-ws']:.0f} MB/s)", text["proxy-kube"] >= 0.8 * text["direct-ws"]),
        ("throughput >= `kubectl exec` (text)", f"{text['proxy-kube'] / text['kubectl']:.2f} x "
         f"({text['proxy-kube']:.0f} vs {text['kubectl']:.0f} MB/s)", text["proxy-kube"] >= text["kubectl"]),
        ("every concurrent stream completes", f"{errors} errors", errors == 0),
        ("proxy RSS under concurrent streams < 150 MB", f"{peak:.0f} MB peak", peak < 150),
        ("a slow reader grows RSS by a few MB at most", f"+ {growth:.1f} MB", growth < 8),
    ]  # fmt: skip
    lines = ["## Against the targets (figures from the run above)", "", "| target | result | met? |",
             "|---|---|---|"]  # fmt: skip
    lines += [f"| {target} | {result} | {'yes' if met else '**no**'} |" for target, result, met in rows]
    return "\n".join(lines) + "\n"


SECTION_BEGIN = "<!-- written by bench/run.py ({name}); edit around it, not in it -->"
SECTION_END = "<!-- end of what bench/run.py ({name}) writes -->"


def write_sections(path: Path, sections: dict[str, str]) -> None:
    """Put each named section of the report into ``path`` in place of its previous run, keeping
    every other line of the file (the hand-written sections) as it is; a new one is appended."""
    text = path.read_text() if path.exists() else ""
    for name, body in sections.items():
        begin, end = SECTION_BEGIN.format(name=name), SECTION_END.format(name=name)
        block = f"{begin}\n{body.rstrip()}\n{end}\n"
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end) + r"\n", re.DOTALL)
        text, found = pattern.subn(lambda _, block=block: block, text)
        if not found:
            text += ("\n" if text else "") + block
    path.write_text(text)


async def latency_only(sizes: Sizes) -> str:
    """Just the round-trip table (for checking a change quickly)."""
    work = Path(tempfile.mkdtemp(prefix="session-proxy-bench-"))
    api = Spawned(
        [sys.executable, "-m", "tests.kube_api_server", "--dir", str(work / "kube")], work / "api.log"
    )
    spawned = [api]
    try:
        kubeconfig = Path(api.wait_for(r"kubeconfig: (\S+)").group(1))
        proxy_kube, kube_url, _, _ = start_proxy(work, "proxy-kube", "--backend", "kubernetes", "--kubeconfig",
                                                 str(kubeconfig), "--session-name", "demo")  # fmt: skip
        proxy_local, local_url, _, _ = start_proxy(work, "proxy-local", "--backend", "local")
        spawned += [proxy_kube, proxy_local]
        results = Results()
        async with Contenders(kubeconfig, work, kube_url, local_url).opened() as contenders:
            await measure_latency(contenders, sizes, results)
        lines = [f"| {n} | {statistics.median(v) * 1000:.1f} | {percentile(v, 0.99) * 1000:.1f} |"
                 for n, v in results.latency.items()]  # fmt: skip
        return "\n".join(["| contender | p50 ms | p99 ms |", "|---|---|---|", *lines])
    finally:
        for process in reversed(spawned):
            process.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


async def warm_section(work: Path, sizes: Sizes, command: str) -> str:
    """Warm and cold proxy-kube against direct-ws and kubectl, with a modelled start cost."""
    import warm_start

    started = f"Run on {date.today().isoformat()}, {psutil.cpu_count()} CPUs; `{command}`."

    from tests.supervisor_build import supervisor_binary

    figures = await warm_start.measure(
        work, sizes.warm_runs, sizes.warm_levels, sizes.idle_seconds, Spawned, start_proxy, Contenders,
        supervisor_binary(),
    )  # fmt: skip
    return warm_start.render(figures, sizes.warm_runs, sizes.warm_levels, started)


def invoked() -> str:
    """The command line this run was started with, as a reader would type it."""
    return " ".join(["python bench/run.py", *sys.argv[1:]])


def supervisor_section(sizes: Sizes) -> str:
    """The supervisor's size and per-exec cost against the shell wrapper and the floor."""
    import supervisor

    return supervisor.section(max(3, sizes.latency_runs // 2), invoked())


async def warm_only(sizes: Sizes, out: Path | None) -> str:
    work = Path(tempfile.mkdtemp(prefix="session-proxy-bench-"))
    try:
        report = await warm_section(work, sizes, invoked())
        if out is not None:
            write_sections(out, {"warm execs": report})
        return report
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


async def memory_section(work: Path, runs: int, *, quick: bool = False) -> str:
    """Idle RSS per backend, after the first MCP call and after bursts of dropped execs."""
    import memory

    return memory.render(await memory.measure(work, runs, Spawned, quick=quick))


async def memory_only(runs: int, out: Path | None, *, quick: bool) -> str:
    work = Path(tempfile.mkdtemp(prefix="session-proxy-bench-"))
    try:
        section = await memory_section(work, runs, quick=quick)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    if out is not None:
        import memory

        memory.write_section(out, section)
    return section


async def main_async(sizes: Sizes, out: Path | None) -> str:
    work = Path(tempfile.mkdtemp(prefix="session-proxy-bench-"))
    make_payloads(work, sizes.throughput_bytes)
    api = Spawned(
        [sys.executable, "-m", "tests.kube_api_server", "--dir", str(work / "kube")], work / "api.log"
    )
    spawned = [api]
    try:
        match = api.wait_for(r"kubeconfig: (\S+)\s+\(pod workspace-demo runs commands in (\S+)\)")
        kubeconfig = Path(match.group(1))
        # The sections below measure a new exec per command (cold); warm execs have their own.
        kube_flags = ("--backend", "kubernetes", "--kubeconfig", str(kubeconfig), "--session-name", "demo",
                      "--warm-execs", "0")  # fmt: skip
        startups_kube, startups_local = [], []
        for index in range(sizes.startups):
            for flags, bucket, name in (
                (kube_flags, startups_kube, "kube"),
                (("--backend", "local"), startups_local, "local"),
            ):
                process, *_, seconds = start_proxy(work, f"startup-{name}-{index}", *flags)
                bucket.append(seconds)
                process.stop()
        proxy_kube, kube_url, _, _ = start_proxy(work, "proxy-kube", *kube_flags)
        proxy_local, local_url, _, _ = start_proxy(work, "proxy-local", "--backend", "local")
        spawned += [proxy_kube, proxy_local]
        await asyncio.sleep(0.5)
        results = Results()
        results.footprint.update(
            idle_rss_kube_mb=proxy_kube.ps.memory_info().rss / MiB,
            idle_rss_local_mb=proxy_local.ps.memory_info().rss / MiB,
            startup_kube_s=statistics.median(startups_kube),
            startup_local_s=statistics.median(startups_local),
        )
        proxies = {"proxy-kube": proxy_kube, "proxy-local": proxy_local}
        async with Contenders(kubeconfig, work, kube_url, local_url).opened() as contenders:
            await measure_latency(contenders, sizes, results)
            await measure_throughput(contenders, sizes, results, proxies)
            await measure_concurrency(contenders, sizes, results, proxies)
            proxy_slow, slow_url, _, _ = start_proxy(work, "proxy-slow", *kube_flags)
            spawned.append(proxy_slow)
            await measure_slow_reader(contenders, results, proxy_slow, slow_url)
        main = render(results, sizes) + "\n" + render_targets(results)
        warm = await warm_section(work, sizes, invoked())
        supervisor = supervisor_section(sizes)
        report = main + "\n" + warm + "\n" + supervisor
        memory_report = ""
        if sizes.latency_runs >= 10:  # not in --quick: its own smoke test runs --memory-only --quick
            memory_report = await memory_section(work, 5)
            report += "\n" + memory_report
        if out is not None:
            import memory

            write_sections(out, {"main": main, "warm execs": warm, "supervisor": supervisor})
            if memory_report:
                memory.write_section(out, memory_report)
        (work / "results.json").write_text(json.dumps(results.__dict__, default=str))
        return report
    finally:
        for process in reversed(spawned):
            process.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--latency-only", action="store_true", help="only the round-trip table")
    parser.add_argument("--warm-only", action="store_true", help="only the warm-exec section")
    parser.add_argument("--idle-seconds", type=float, help="how long the idle-pool cost is measured")
    parser.add_argument(
        "--memory-only", action="store_true", help="only the memory section (--out: update it there)"
    )
    parser.add_argument(
        "--memory-runs", type=int, default=5, help="runs of the memory section (--memory-only)"
    )
    arguments = parser.parse_args()
    sizes = Sizes.quick() if arguments.quick else Sizes()
    if arguments.idle_seconds is not None:
        sizes.idle_seconds = arguments.idle_seconds
    if arguments.warm_only:
        print(asyncio.run(warm_only(sizes, arguments.out)))
        return
    if arguments.memory_only:
        runs = 1 if arguments.quick else arguments.memory_runs
        print(asyncio.run(memory_only(runs, arguments.out, quick=arguments.quick)))
        return
    if arguments.latency_only:
        print(asyncio.run(latency_only(sizes)))
        return
    print(asyncio.run(main_async(sizes, arguments.out)))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    main()
