"""Warm execs against cold ones and the alternatives, with a modelled container-runtime start cost.

Each exec'd process starts only after ``--exec-start-delay`` on the Kubernetes API test server:
0 ms (a free start) and 25 ms (runc exec alone measured 4-27 ms per exec in
opencontainers/runc#4432 and opencontainers/runc#4448), on both of its modes (modern: v5 and v4; old: v4 only).
Contenders, all against the same server, p50 of `true`:
  proxy-kube warm   session-proxy with a warm pool (each sample starts with the pool full: the
                    steady state of an agent that thinks between commands)
  proxy-kube cold   session-proxy with --warm-execs 0 (a new exec per command)
                    (each of these two under both workspace runners: `sh`, the shell wrapper that
                    any image with /bin/sh gets; `sup`, the static workspace supervisor that the
                    session template installs)
  direct-ws         an in-process WebSocket exec, plain argv, no proxy hop
  kubectl           the real `kubectl exec` binary
Then the idle cost: a proxy with the default pool, idle, over a period: its RSS and CPU, and the
workspace processes its pool holds.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

START_COSTS = (0.0, 0.025)
MODES = ("modern", "old")
# kubectl speaks v5 only over WebSocket, then falls back to SPDY, which the test server lacks.
KUBECTL_MODES = ("modern",)
RUNNERS = ("sh", "sup")  # the shell wrapper; the workspace supervisor
PROXIED = tuple(f"proxy-kube {path} {runner}" for runner in RUNNERS for path in ("warm", "cold"))
CONTENDERS = (*PROXIED, "direct-ws", "kubectl")
# Targets, at concurrency 1: warm / direct-ws by start cost; cold - direct-ws; proxy / kubectl.
WARM_TARGETS = {0.0: 0.75, 0.025: 0.25}
COLD_MARGIN = 0.005
KUBECTL_TARGET = 0.25
Cell = tuple[str, float, str, int]  # (mode, start cost, contender, concurrency)


@dataclass
class WarmFigures:
    p50: dict[Cell, float] = field(default_factory=dict)  # seconds
    warm_share: dict[tuple[str, float, int], float] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)


async def pool_ready(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/status") as response:
        return int(((await response.json())["target"].get("warm_pool") or {}).get("ready", 0))


async def wait_for_full_pool(http: aiohttp.ClientSession, url: str, size: int) -> None:
    deadline = time.monotonic() + 60
    while await pool_ready(http, url) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool at {url} did not fill")
        await asyncio.sleep(0.005)


async def exec_true(http: aiohttp.ClientSession, url: str) -> bool:
    """POST /exec of `true`; whether it started warm."""
    async with http.post(f"{url}/exec", json={"command": ["true"]}) as response:
        body = await response.read()
    first, _, _ = body.partition(b"\n")
    if b'"reason":"exited"' not in body:
        raise RuntimeError(f"proxy: did not end normally: {body[-300:]!r}")
    return bool(json.loads(first).get("warm"))


async def sample(
    run: Callable[[], Awaitable[bool]], level: int, samples: int, before: Callable[[], Awaitable[None]]
) -> tuple[list[float], int]:
    """``samples`` round trips, ``level`` at a time; their durations and how many started warm."""
    durations: list[float] = []
    warm = 0

    async def one() -> None:
        nonlocal warm
        started = time.perf_counter()
        started_warm = await run()  # (not `warm += await ...`: that reads warm before awaiting)
        durations.append(time.perf_counter() - started)
        warm += started_warm

    for _ in range(3):
        await run()  # warm up: connections, discovery cache, image probe
    for _ in range(max(1, samples // level)):
        await before()
        await asyncio.gather(*(one() for _ in range(level)))
    return durations, warm


async def measure_cost(
    mode: str, cost: float, work: Path, runs: int, levels: tuple[int, ...], spawn: Any, start_proxy: Any,
    contenders: Any, supervisor: Path,
) -> tuple[dict[Cell, float], dict[tuple[str, float, int], float]]:  # fmt: skip
    name = f"{mode}-cost-{int(cost * 1000)}ms"
    api = spawn([sys.executable, "-m", "tests.kube_api_server", "--dir", str(work / name), "--mode", mode,
                 "--exec-start-delay", str(cost)], work / f"{name}-api.log")  # fmt: skip
    spawned = [api]
    p50: dict[Cell, float] = {}
    share: dict[tuple[str, float, int], float] = {}
    try:
        kubeconfig = Path(api.wait_for(r"kubeconfig: (\S+)").group(1))
        flags = ("--backend", "kubernetes", "--kubeconfig", str(kubeconfig), "--session-name", "demo")
        pool = max(levels)
        urls: dict[str, str] = {}
        for runner, where in (("sh", work / "no-supervisor"), ("sup", supervisor)):
            for path, size in (("warm", pool), ("cold", 0)):
                proxy, urls[f"proxy-kube {path} {runner}"], _, _ = start_proxy(
                    work, f"{name}-{path}-{runner}", *flags, "--warm-execs", str(size),
                    "--workspace-supervisor", str(where))  # fmt: skip
                spawned.append(proxy)
        async with contenders(
            kubeconfig, work, urls["proxy-kube warm sh"], urls["proxy-kube cold sh"]
        ).opened() as ready:
            http = ready.http

            async def nothing() -> None:
                return None

            def full_pool(url: str) -> Callable[[], Awaitable[None]]:
                async def wait() -> None:
                    await wait_for_full_pool(http, url, pool)

                return wait

            async def via(runner: Any) -> bool:
                await runner(["true"], None)
                return False

            def proxied(url: str) -> Callable[[], Awaitable[bool]]:
                return lambda: exec_true(http, url)

            runs_by_name: dict[str, tuple[Callable[[], Awaitable[bool]], Callable[[], Awaitable[None]]]] = {
                who: (proxied(url), full_pool(url) if " warm " in who else nothing)
                for who, url in urls.items()
            }
            runs_by_name |= {
                "direct-ws": (lambda: via(ready.via_websocket), nothing),
                "kubectl": (lambda: via(ready.via_kubectl), nothing),
            }
            for level in levels:
                for who in CONTENDERS:
                    if who == "kubectl" and mode not in KUBECTL_MODES:
                        continue
                    run, before = runs_by_name[who]
                    durations, warm_starts = await sample(run, level, runs, before)
                    p50[(mode, cost, who, level)] = statistics.median(durations)
                    if " warm " in who:
                        share[(mode, cost, level)] = min(share.get((mode, cost, level), 1.0),
                                                         warm_starts / len(durations))  # fmt: skip
    finally:
        for process in reversed(spawned):
            process.stop()
    return p50, share


async def measure_idle(work: Path, seconds: float, spawn: Any, start_proxy: Any) -> dict[str, float]:
    """A proxy with the default pool (2), one request, then idle for ``seconds``."""
    api = spawn([sys.executable, "-m", "tests.kube_api_server", "--dir", str(work / "idle")],
                work / "idle-api.log")  # fmt: skip
    spawned = [api]
    try:
        kubeconfig = Path(api.wait_for(r"kubeconfig: (\S+)").group(1))
        # --warm-exec-idle above the period, so the pool stays open for all of it.
        proxy, url, _, _ = start_proxy(work, "idle-proxy", "--backend", "kubernetes", "--kubeconfig",
                                       str(kubeconfig), "--session-name", "demo",
                                       "--warm-exec-idle", str(seconds + 60))  # fmt: skip
        spawned.append(proxy)
        async with aiohttp.ClientSession() as http:
            await exec_true(http, url)
            await wait_for_full_pool(http, url, 2)
            await asyncio.sleep(1)  # let the last request's clean-up finish
            rss_start, cpu_start = proxy.ps.memory_info().rss, proxy.cpu_seconds()
            peak = rss_start
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                await asyncio.sleep(min(1.0, seconds))
                peak = max(peak, proxy.ps.memory_info().rss)
            held = [p for p in api.ps.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
            shells = [p for p in held if p.cmdline()[1:2] == ["-c"]]
            return {
                "seconds": seconds,
                "rss_start_mb": rss_start / 2**20,
                "rss_peak_mb": peak / 2**20,
                "cpu_s": proxy.cpu_seconds() - cpu_start,
                "workspace_shells": len(shells),
                "workspace_other": len(held) - len(shells),
                "workspace_rss_mb": sum(p.memory_info().rss for p in shells) / 2**20,
                "pool_ready_end": await pool_ready(http, url),
            }
    finally:
        for process in reversed(spawned):
            process.stop()


async def measure(
    work: Path, runs: int, levels: tuple[int, ...], idle_seconds: float, spawn: Any, start_proxy: Any,
    contenders: Any, supervisor: Path,
) -> WarmFigures:  # fmt: skip
    figures = WarmFigures()
    for mode in MODES:
        for cost in START_COSTS:
            p50, share = await measure_cost(
                mode, cost, work, runs, levels, spawn, start_proxy, contenders, supervisor
            )
            figures.p50.update(p50)
            figures.warm_share.update(share)
    figures.idle = await measure_idle(work, idle_seconds, spawn, start_proxy)
    return figures


def render(figures: WarmFigures, runs: int, levels: tuple[int, ...], started: str) -> str:
    def ms(mode: str, cost: float, who: str, level: int) -> float:
        return figures.p50.get((mode, cost, who, level), float("nan")) * 1000

    lines = [
        "## Warm execs: start cost of `true`, warm and cold, against the alternatives",
        "",
        started,
        "",
        f"p50 ms of `true`, {runs} samples per cell, on both modes of the API test server (modern: v5 "
        "and v4; old: v4 only), at each concurrency and modelled container-runtime start cost "
        "(`exec_start_delay` on the API test server, before each exec'd process starts; runc exec alone "
        "measured 4-27 ms, opencontainers/runc#4432, opencontainers/runc#4448). The proxy runs commands under either "
        "workspace runner: **sup**, the static workspace supervisor the session template installs, and "
        "**sh**, the shell wrapper any image with `/bin/sh` gets. Warm: a pool as large as the concurrency "
        f"(`--warm-execs {max(levels)}`), each batch starting with it full; cold: `--warm-execs 0`.",
        "",
        "| server | start cost | concurrency | warm sup | cold sup | warm sh | cold sh | direct-ws | kubectl "
        "| warm sup / direct-ws | warm sh / direct-ws | cold sup − direct-ws | warm starts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        for cost in START_COSTS:
            for level in levels:
                cell = (mode, cost)
                warm_sup, cold_sup = (
                    ms(*cell, "proxy-kube warm sup", level),
                    ms(*cell, "proxy-kube cold sup", level),
                )
                warm_sh, cold_sh = (
                    ms(*cell, "proxy-kube warm sh", level),
                    ms(*cell, "proxy-kube cold sh", level),
                )
                direct, kubectl = ms(*cell, "direct-ws", level), ms(*cell, "kubectl", level)
                row = (
                    f"| {mode} | {cost * 1000:.0f} ms | {level} | {warm_sup:.1f} | {cold_sup:.1f} | {warm_sh:.1f} "
                    f"| {cold_sh:.1f} | {direct:.1f} | {kubectl:.1f} | **{warm_sup / direct:.2f}** "
                    f"| {warm_sh / direct:.2f} | {cold_sup - direct:+.1f} ms "
                    f"| {figures.warm_share[(mode, cost, level)]:.0%} |"
                )
                lines.append(row.replace("| nan |", "| — |"))
    lines += ["", "kubectl runs against the modern server only: it offers v5 alone over WebSocket, then "
              "falls back to SPDY, which the test server does not speak.", "",
              "Targets, at concurrency 1 (from the table above), for each runner:", "",
              "| server | runner | target | figure | met? |", "|---|---|---|---|---|"]  # fmt: skip
    for mode in MODES:
        for runner in ("sup", "sh"):
            warm_who, cold_who = f"proxy-kube warm {runner}", f"proxy-kube cold {runner}"
            for cost, target in WARM_TARGETS.items():
                ratio = ms(mode, cost, warm_who, 1) / ms(mode, cost, "direct-ws", 1)
                lines.append(
                    f"| {mode} | {runner} | warm <= {target} x direct-ws at {cost * 1000:.0f} ms start cost | "
                    f"{ratio:.2f} x | {verdict(ratio <= target)} |"
                )
            for cost in START_COSTS:
                cold = ms(mode, cost, cold_who, 1) - ms(mode, cost, "direct-ws", 1)
                lines.append(
                    f"| {mode} | {runner} | cold <= direct-ws + {COLD_MARGIN * 1000:.0f} ms at {cost * 1000:.0f} ms "
                    f"start cost | {cold:+.1f} ms | {verdict(cold <= COLD_MARGIN * 1000)} |"
                )
            for cost in START_COSTS if mode in KUBECTL_MODES else ():
                for who in (warm_who, cold_who):
                    ratio = ms(mode, cost, who, 1) / ms(mode, cost, "kubectl", 1)
                    lines.append(
                        f"| {mode} | {runner} | {who.split()[1]} <= {KUBECTL_TARGET} x kubectl at "
                        f"{cost * 1000:.0f} ms start cost | {ratio:.2f} x | {verdict(ratio <= KUBECTL_TARGET)} |"
                    )
    idle = figures.idle
    lines += [
        "",
        f"Idle cost: a proxy with the default pool (2 warm execs), idle for {idle['seconds']:.0f} s after "
        f"one request: RSS {idle['rss_start_mb']:.0f} MB at the start, {idle['rss_peak_mb']:.0f} MB at its "
        f"peak; CPU {idle['cpu_s']:.2f} s in all ({idle['cpu_s'] / idle['seconds'] * 100:.2f} % of a core; "
        "pings every 5 s on each warm exec, and a replacement of each every 300 s). In the workspace the "
        f"pool holds {idle['workspace_shells']:.0f} processes (a waiting `sh` per warm exec), "
        f"{idle['workspace_rss_mb']:.1f} MB RSS in all; {idle['pool_ready_end']:.0f} warm execs ready at the end "
        f"(other workspace processes left by the one request: {idle['workspace_other']:.0f}).",
    ]
    return "\n".join(lines) + "\n"


def verdict(met: bool) -> str:
    return "yes" if met else "**no**"
