"""Memory: what one proxy costs at rest, after its first MCP call, and after bursts of dropped execs.

    python bench/run.py --memory-only [--memory-runs 5] [--out BENCHMARKS.md]   (also in a full run)

A proxy runs once per session, so its idle RSS is paid once per session. Each run starts one
proxy per row, in turn, with the production defaults (only the rate limit off, so that a burst
is not refused): the local backend; the kubernetes backend configured as in a pod (token file,
CA file, KUBERNETES_SERVICE_HOST/PORT); the kubernetes backend through a kubeconfig (which
loads kubernetes-asyncio); and the in-cluster proxy again with ``MALLOC_TRIM_THRESHOLD_=0``
(glibc gives freed memory back at once), which shows how much of what it holds is the
allocator's. For each: RSS once ready and settled; after the first MCP session (initialize, one
`exec` tool call); after a burst of dropped execs (waves of --max-concurrent commands that
print without pause, each client hanging up after the first output line, then waiting until
the proxy has ended them all), and after a second, identical burst: growth the second burst
does not repeat is held once and reused, not a leak. VmHWM is the process's peak RSS over the
run. Medians over the runs.

Also the import-only floor: the peak RSS of a Python process that does only the import.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import psutil

MiB = 1024 * 1024
WAVES = 5  # waves of --max-concurrent dropped execs per burst
MAX_CONCURRENT = 10  # the proxy's default, as in the manifests
PRINTS_WITHOUT_PAUSE = ["sh", "-c", "while :; do echo 0123456789abcdef0123456789abcdef0123456789abcdef; done"]
ROWS = {
    "local": "local backend",
    "in-cluster": "kubernetes, in-cluster (a pod's token, CA, service variables)",
    "kubeconfig": "kubernetes, kubeconfig (loads kubernetes-asyncio)",
    "in-cluster-trim": "kubernetes, in-cluster, `MALLOC_TRIM_THRESHOLD_=0` (glibc gives freed memory back at once)",
}
IMPORTS = {
    "nothing (Python)": "pass",
    "aiohttp, pydantic, prometheus_client, aiolimiter": "import aiohttp, pydantic, prometheus_client, aiolimiter",
    "`session_proxy.app` (local backend)": "import session_proxy.app",
    "+ the kubernetes backend (in-cluster)": "import session_proxy.app, session_proxy.backends.kubernetes.backend",
    "+ `kubernetes_asyncio.config` (a kubeconfig)": "import session_proxy.app, kubernetes_asyncio.config",
    "+ the MCP SDK's server side (as `/mcp` loads it)": "import session_proxy.app; from session_proxy.mcp.sdk import "
    "import_server_side; import_server_side('session_proxy.mcp.tools', 'mcp.server.streamable_http_manager')",
    "+ the whole MCP SDK (a plain `import mcp...`)": "import session_proxy.app, session_proxy.mcp.tools, "
    "mcp.server.streamable_http_manager",
}


@dataclass
class MemoryFigures:
    runs: int
    waves: int
    settle: float  # seconds before each reading
    rss: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # row -> stage -> MB per run
    imports: dict[str, float] = field(default_factory=dict)

    def add(self, row: str, stage: str, mb: float) -> None:
        self.rss.setdefault(row, {}).setdefault(stage, []).append(mb)

    def median(self, row: str, stage: str) -> float:
        values = self.rss.get(row, {}).get(stage)
        return statistics.median(values) if values else float("nan")


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / MiB


def peak_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set so far (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def import_peak_mb(statement: str) -> float:
    # VmHWM, not ru_maxrss: a child's ru_maxrss keeps the peak of the forked copy of this process.
    code = f"{statement}\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def in_cluster_files(kubeconfig: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """What a pod would have for the API server in the kubeconfig: flags for the token and CA
    files, and the service variables."""
    config = json.loads(kubeconfig.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    (work / "sa-token").write_text(user["token"] + "\n")
    (work / "sa-ca.crt").write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    host, port = str(cluster["server"]).removeprefix("https://").rsplit(":", 1)
    flags = ["--token-file", str(work / "sa-token"), "--ca-file", str(work / "sa-ca.crt")]
    return flags, {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "KUBECONFIG": ""}


async def start(spawn: Any, work: Path, name: str, flags: list[str], env: dict[str, str]) -> tuple[Any, str]:
    """A proxy with the production defaults (rate limit off); its exec URL once /readyz says 200."""
    proxy = spawn([sys.executable, "-m", "session_proxy", "serve", "--listen", "127.0.0.1:0",
                   "--ops-listen", "127.0.0.1:0", "--rate-limit", "0", "--local-root", str(work), *flags],
                  work / f"{name}.log", env)  # fmt: skip
    match = proxy.wait_for(r'"exec_url": "([^"]+)", "ops_url": "([^"]+)"')
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{match.group(2)}/readyz") as response:
                    if response.status == 200:
                        return proxy, match.group(1)
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.01)
    raise RuntimeError(f"{name} did not become ready")


async def first_mcp_call(url: str) -> None:
    """An MCP client's first session: initialize, then run `true` through the `exec` tool."""
    from tests.mcp_client import http_session

    async with http_session(url) as session:
        result = await session.call_tool("exec", {"argv": ["true"]})
        if result.is_error:
            raise RuntimeError(f"the MCP exec failed: {result.content}")


async def dropped_exec(http: aiohttp.ClientSession, url: str) -> None:
    """Start a command that prints without pause, read up to its first output, hang up."""
    for _ in range(200):
        response = await http.post(f"{url}/exec", json={"command": PRINTS_WITHOUT_PAUSE, "timeout": 60})
        if response.status != 429:  # the last wave's slots may still be releasing: wait for them
            break
        response.close()
        await asyncio.sleep(0.05)
    try:
        if response.status != 200:
            raise RuntimeError(f"exec refused: {response.status} {await response.text()}")
        while b'"type":"stdout"' not in await response.content.readline():
            pass
    finally:
        response.close()


async def wait_until_idle(http: aiohttp.ClientSession, url: str) -> None:
    """Until the proxy has ended every dropped exec (kill execs and clean-up included)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with http.get(f"{url}/status") as response:
            if (await response.json())["in_flight"] == 0:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError("dropped execs still in flight after 60 s")


async def burst(url: str, waves: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(waves):
            await asyncio.gather(*(dropped_exec(http, url) for _ in range(MAX_CONCURRENT)))
            await wait_until_idle(http, url)


async def measure_row(spawn: Any, work: Path, row: str, index: int, flags: list[str], env: dict[str, str],
                      figures: MemoryFigures) -> None:  # fmt: skip
    proxy, url = await start(spawn, work, f"memory-{row}-{index}", flags, env)
    try:
        await asyncio.sleep(figures.settle)  # start-up garbage settles
        figures.add(row, "idle", rss_mb(proxy.ps))
        await first_mcp_call(url)
        await asyncio.sleep(figures.settle)
        figures.add(row, "mcp", rss_mb(proxy.ps))
        if row != "kubeconfig":  # the kubeconfig row shows what kubernetes-asyncio costs at rest
            for stage in ("burst", "burst2"):
                await burst(url, figures.waves)
                await asyncio.sleep(figures.settle)
                figures.add(row, stage, rss_mb(proxy.ps))
        figures.add(row, "peak", peak_mb(proxy.process.pid))
    finally:
        proxy.stop()


async def measure(work: Path, runs: int, spawn: Any, *, quick: bool = False) -> MemoryFigures:
    """``quick``: one wave per burst, no settling, one import each (a smoke test, not a measurement)."""
    figures = MemoryFigures(runs, 1 if quick else WAVES, 0.0 if quick else 1.0)
    for label, statement in IMPORTS.items():
        figures.imports[label] = statistics.median(
            import_peak_mb(statement) for _ in range(1 if quick else 3)
        )
    api = spawn([sys.executable, "-m", "tests.kube_api_server", "--dir", str(work / "memory-kube")],
                work / "memory-api.log")  # fmt: skip
    try:
        kubeconfig = Path(api.wait_for(r"kubeconfig: (\S+)").group(1))
        pod_flags, pod_env = in_cluster_files(kubeconfig, work)
        kube = ["--backend", "kubernetes", "--session-name", "demo"]
        setups = {
            "local": (["--backend", "local"], {}),
            "in-cluster": ([*kube, *pod_flags], pod_env),
            "kubeconfig": ([*kube, "--kubeconfig", str(kubeconfig)], {}),
            "in-cluster-trim": ([*kube, *pod_flags], {**pod_env, "MALLOC_TRIM_THRESHOLD_": "0"}),
        }
        for index in range(runs):
            for row, (flags, env) in setups.items():
                await measure_row(spawn, work, row, index, flags, env, figures)
    finally:
        api.stop()
    return figures


def render(figures: MemoryFigures) -> str:
    m = figures.median
    lines = [
        "## Memory: at rest, after the first MCP call, after bursts of dropped execs",
        "",
        f"Run on {date.today().isoformat()}, {psutil.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.machine()}; `python bench/run.py --memory-only --memory-runs {figures.runs}` (median of "
        f"{figures.runs} runs; every row's proxy a fresh process, the rows in turn, same machine and run).",
        "Production defaults (`--max-concurrent 10`, two warm execs), the rate limit off. A burst is",
        f"{figures.waves} waves of 10 commands that print without pause, each client hanging up after the first",
        f"output line, and the proxy ending all of them before the next wave ({figures.waves * MAX_CONCURRENT} dropped execs).",
        "MB are MiB here (2^20 bytes, the manifests' `Mi`).",
        "",
        "| proxy | idle RSS | after the first MCP call | after a burst | after a second burst | peak (VmHWM) |",
        "|---|---|---|---|---|---|",
    ]
    for row, label in ROWS.items():
        cells = [f"{m(row, stage):.1f} MB" if m(row, stage) == m(row, stage) else "—"
                 for stage in ("idle", "mcp", "burst", "burst2", "peak")]  # fmt: skip
        lines.append(f"| {label} | {' | '.join(cells)} |")
    kube_idle, kube_mcp = m("in-cluster", "idle"), m("in-cluster", "mcp")
    retained = m("in-cluster", "burst") - kube_mcp
    trimmed = m("in-cluster", "burst2") - m("in-cluster-trim", "burst2")
    repeat = m("in-cluster", "burst2") - m("in-cluster", "burst")
    lines += [
        "",
        f"Against the target, in-cluster (the production path): idle **{kube_idle:.1f} MB** (≤ 60 MB: "
        f"{'met' if kube_idle <= 60 else 'not met'}), after the first MCP call **{kube_mcp:.1f} MB** (≤ 75 MB: "
        f"{'met' if kube_mcp <= 75 else 'not met'}); the local backend idles at {m('local', 'idle'):.1f} MB "
        f"in the same run. Through a kubeconfig, kubernetes-asyncio adds "
        f"{m('kubeconfig', 'idle') - kube_idle:.1f} MB at rest.",
        "",
        f"Allocator retention: after the first burst the in-cluster proxy's RSS has moved by {retained:+.1f} MB;",
        f"the second, identical burst moves it by {repeat + 0.0:+.1f} MB. "
        + (
            "So what the first burst leaves is held once and reused, not a growth per exec. "
            if repeat <= max(1.0, retained / 2)
            else "The second burst grows it again: that is more than retention; look for a leak. "
        )
        + f"Of it, {trimmed:.1f} MB is glibc keeping the freed top of its heap for reuse: with "
        f"`MALLOC_TRIM_THRESHOLD_=0` the same proxy settles at {m('in-cluster-trim', 'burst2'):.1f} MB. "
        "The rest stays with either setting.",
        "",
        *sizing(figures),
        "",
        'Import-only floor (peak RSS of `python -c "<import>"`, median of 3):',
        "",
        "| import | peak RSS |",
        "|---|---|",
        *[f"| {label} | {mb:.1f} MB |" for label, mb in figures.imports.items()],
        "",
    ]
    return "\n".join(lines)


def sizing(figures: MemoryFigures) -> list[str]:
    """The sidecar's memory request and limit, from the in-cluster row."""
    settled, peak = figures.median("in-cluster", "burst2"), figures.median("in-cluster", "peak")
    request = math.ceil(settled * 1.1 / 16) * 16
    limit = math.ceil(peak * 2 / 32) * 32
    return [
        f"Sizing the sidecar (`manifests/session/runner-pod.yaml`): memory request **{request}Mi**, the in-cluster "
        f"RSS after the bursts ({settled:.1f} MB, what a session that has run commands holds) plus at",
        f"least 10%, rounded up to 16 Mi; limit **{limit}Mi**, twice the peak ({peak:.1f} MB), rounded up to",
        "32 Mi: headroom for what this run does not do at once (an 8 MiB log tail, several MCP",
        "sessions, concurrent streams that back up to their buffers). A larger `--max-concurrent`",
        "wants a larger limit (the concurrency table above: 100 streams on a kubeconfig proxy).",
    ]


def write_section(path: Path, section: str) -> None:
    """Put ``section`` in the Markdown file at ``path`` in place of its own earlier version (from
    its heading to the next ``## `` heading), or at the end; the rest of the file is kept."""
    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else ""
    start = text.find(heading.split(":")[0] + ":")
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + 1)
    path.write_text(text[:start] + section + (text[end + 1 :] if end >= 0 else ""))
