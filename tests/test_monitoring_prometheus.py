"""A real Prometheus on loopback scrapes a real proxy (local backend) and evaluates the shipped
rules: after known execs, its counts match what was run, every recording rule has series, and
every dashboard query evaluates, all but the Kubernetes-only one with data (all of them on the
kubernetes backend, against the Kubernetes API test server)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from .conftest import KubeSetup, ProxyFactory, RunningProxy, exec_events, final

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "manifests" / "monitoring"
NAMESPACE, POD = "sessions", "runner-test"
# Template variables of the dashboard, as Grafana would substitute them for this proxy.
VARIABLES = {"$namespace": NAMESPACE, "$pod": POD, "$__rate_interval": "1m"}
# On the local backend nothing calls the Kubernetes API, so this panel alone has no data.
KUBERNETES_ONLY_PANELS = {"Kubernetes API latency by verb"}
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def rule_groups() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
    return spec


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with http.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        data = await self.api(http, "query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def eventually(
        self, produce: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, within: float = 30
    ) -> T:
        """Poll ``produce`` until ``done`` says yes; fail with the last value after ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = await produce()
            if done(value):
                return value
            assert self.process.poll() is None, f"prometheus exited:\n{self.log()}"
            assert loop.time() < deadline, f"{what}: still {value!r}\n{self.log()}"
            await asyncio.sleep(0.1)


async def start_prometheus(http: aiohttp.ClientSession, directory: Path, target: str) -> Prometheus:
    """Start Prometheus scraping ``target`` every second with the shipped rules; wait until ready."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus (Debian package prometheus) is required; .ci/run installs it"
    (directory / "rules.yaml").write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                "job_name": "session-proxy",
                # The labels the PodMonitor's targets get from prometheus-operator.
                "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = directory / "prometheus.log"
    port = free_port()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)

    async def ready() -> int:
        try:
            async with http.get(f"{prometheus.url}/-/ready") as response:
                return response.status
        except aiohttp.ClientConnectionError:
            return 0

    await prometheus.eventually(ready, lambda status: status == 200, "prometheus readiness")
    return prometheus


@pytest.fixture
async def prometheus_for(
    http: aiohttp.ClientSession, tmp_path: Path
) -> AsyncIterator[Callable[[RunningProxy], Awaitable[Prometheus]]]:
    """Start a real Prometheus scraping a given proxy; stopped (and waited for) at teardown."""
    started: list[Prometheus] = []

    async def start(proxy: RunningProxy) -> Prometheus:
        assert proxy.ops_url is not None
        directory = tmp_path / f"prometheus-{len(started)}"
        directory.mkdir()
        prometheus = await start_prometheus(http, directory, proxy.ops_url.removeprefix("http://"))
        started.append(prometheus)
        return prometheus

    yield start
    for prometheus in started:
        prometheus.process.terminate()
        try:
            prometheus.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prometheus.process.kill()
            prometheus.process.wait()


@dataclass
class Ran:
    """What the test ran, as the proxy reported it to the client."""

    outcomes: dict[str, int]
    rejections: dict[str, int]
    stdout_bytes: int
    stderr_bytes: int
    starts: int


async def run_known_execs(http: aiohttp.ClientSession, proxy: RunningProxy) -> Ran:
    """Successes, a timeout, a missing program, a 429 (concurrency) and a 415."""
    ran = Ran({}, {}, 0, 0, 0)

    def record(events: list[dict[str, Any]]) -> None:
        exit_event = final(events)
        ran.outcomes[exit_event["reason"]] = ran.outcomes.get(exit_event["reason"], 0) + 1
        ran.stdout_bytes += exit_event["stdout_bytes"]
        ran.stderr_bytes += exit_event["stderr_bytes"]
        ran.starts += sum(1 for event in events if event["type"] == "start")

    async def run(body: dict[str, Any]) -> list[dict[str, Any]]:
        async with http.post(f"{proxy.url}/exec", json=body) as response:
            assert response.status == 200, await response.text()
            events = [json.loads(line) for line in (await response.text()).splitlines()]
        record(events)
        return events

    for command in (["sh", "-c", "echo ok"], ["true"], ["sh", "-c", "printf abc >&2; exit 3"]):
        assert final(await run({"command": command}))["reason"] == "exited"
    assert final(await run({"command": ["no-such-program-xyz"]}))["reason"] == "error"
    # The proxy runs with --max-concurrent 1: while the sleeper holds the slot, a second exec is
    # refused with 429; then the sleeper runs out of time.
    async with http.post(f"{proxy.url}/exec", json={"command": ["sleep", "30"], "timeout": 1}) as sleeper:
        assert sleeper.status == 200
        first = json.loads(await sleeper.content.readline())
        assert first["type"] == "start"
        async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as refused:
            assert refused.status == 429
            assert (await refused.json())["error"]["code"] == "concurrency_limit"
        ran.rejections["concurrency_limit"] = 1
        rest = [json.loads(line) for line in (await sleeper.text()).splitlines()]
    record([first, *rest])
    assert final(rest)["reason"] == "timeout"
    async with http.post(f"{proxy.url}/exec", data="{}", headers={"Content-Type": "text/plain"}) as response:
        assert response.status == 415
    ran.rejections["unsupported_media_type"] = 1
    return ran


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {sample["metric"][label]: float(sample["value"][1]) for sample in result}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables substituted."""
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets") or []:
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def variable_queries() -> dict[str, tuple[str, str]]:
    """Each query variable's label_values(selector, label), as (PromQL selector, label)."""
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
            assert match, variable
            found[variable["name"]] = (match.group(1).replace("$namespace", NAMESPACE), match.group(2))
    return found


@pytest.mark.timeout(180)
async def test_prometheus_sees_what_was_run(
    http: aiohttp.ClientSession,
    make_proxy: ProxyFactory,
    prometheus_for: Callable[[RunningProxy], Awaitable[Prometheus]],
) -> None:
    """Scraped by a real Prometheus: exec and rejection counts equal what the test ran, every
    rule loads healthy, every recording rule has series, every dashboard query evaluates and all
    but the Kubernetes-only panel have data; the dashboard's variables find this proxy."""
    proxy = await make_proxy(max_concurrent=1)
    prometheus = await prometheus_for(proxy)

    async def targets() -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = (await prometheus.api(http, "targets"))["activeTargets"]
        return active

    up = await prometheus.eventually(
        targets, lambda active: [t["health"] for t in active] == ["up"], "the proxy as an up target"
    )
    assert up[0]["labels"]["job"] == "session-proxy"

    ran = await run_known_execs(http, proxy)
    selector = f'{{job="session-proxy",namespace="{NAMESPACE}",pod="{POD}"}}'

    async def outcomes() -> dict[str, float]:
        return by_label(
            await prometheus.query(http, f"session_proxy_exec_requests_total{selector}"), "outcome"
        )

    scraped = await prometheus.eventually(
        outcomes, lambda found: sum(found.values()) == sum(ran.outcomes.values()), "exec counts"
    )
    assert {k: v for k, v in scraped.items() if v} == ran.outcomes
    assert ran.outcomes == {"exited": 3, "error": 1, "timeout": 1}
    rejections = by_label(await prometheus.query(http, f"session_proxy_rejections_total{selector}"), "reason")
    assert {k: v for k, v in rejections.items() if v} == ran.rejections
    output = by_label(await prometheus.query(http, f"session_proxy_output_bytes_total{selector}"), "stream")
    assert output == {"stdout": ran.stdout_bytes, "stderr": ran.stderr_bytes}
    durations = await prometheus.query(http, f"session_proxy_exec_duration_seconds_count{selector}")
    assert [float(s["value"][1]) for s in durations] == [sum(ran.outcomes.values())]
    starts = by_label(
        await prometheus.query(http, f"session_proxy_exec_start_latency_seconds_count{selector}"), "path"
    )
    assert starts == {"cold": ran.starts, "warm": 0}
    limit = await prometheus.query(http, f"session_proxy_exec_in_flight_limit{selector}")
    assert [float(s["value"][1]) for s in limit] == [1]

    # Every rule of the PrometheusRule is loaded and healthy.
    groups = (await prometheus.api(http, "rules"))["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert [rule["health"] for rule in loaded] == ["ok"] * len(loaded), [r.get("lastError") for r in loaded]
    shipped = [rule for group in rule_groups()["groups"] for rule in group["rules"]]
    assert len(loaded) == len(shipped)
    assert {r["name"] for r in loaded if r["type"] == "alerting"} == {
        r["alert"] for r in shipped if "alert" in r
    }

    # Every recording rule has series, once evaluated after the execs were scraped.
    async def exited_rate() -> list[dict[str, Any]]:
        return await prometheus.query(
            http, 'namespace_outcome:session_proxy_exec_requests:rate5m{outcome="exited"} > 0'
        )

    await prometheus.eventually(exited_rate, bool, "the exec rate rule after the execs")
    for name in sorted({r["record"] for r in shipped if "record" in r}):
        result = await prometheus.query(http, f'{name}{{namespace="{NAMESPACE}"}}')
        assert result, f"recording rule {name} has no series"
    ratio = await prometheus.query(http, "namespace:session_proxy_exec_transport_failures:ratio_rate5m")
    assert float(ratio[0]["value"][1]) > 0  # the missing program is an `error`

    # Every dashboard query evaluates; all but the Kubernetes-only panel have data.
    empty = set()
    for title, expr in panel_queries():
        if not await prometheus.query(http, expr):
            empty.add(title)
    assert empty == KUBERNETES_ONLY_PANELS
    for name, (series, label) in variable_queries().items():
        values = by_label(await prometheus.query(http, f"count by ({label}) ({series})"), label)
        assert set(values) == {{"namespace": NAMESPACE, "pod": POD}[name]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("api_mode", ["modern"])
@pytest.mark.parametrize("exec_path", ["warm"])  # the default: a warm pool
async def test_prometheus_on_the_kubernetes_backend_fills_every_panel(
    http: aiohttp.ClientSession,
    kube_setup: KubeSetup,
    prometheus_for: Callable[[RunningProxy], Awaitable[Prometheus]],
) -> None:
    """On the kubernetes backend (the API test server) every dashboard query has data, the
    Kubernetes API latency included, and the workspace shows ready."""
    prometheus = await prometheus_for(kube_setup.proxy)

    async def targets() -> list[str]:
        return [t["health"] for t in (await prometheus.api(http, "targets"))["activeTargets"]]

    await prometheus.eventually(targets, lambda health: health == ["up"], "the proxy as an up target")
    for command in (["sh", "-c", "echo hello"], ["sh", "-c", "exit 3"]):
        events = await exec_events(http, kube_setup.proxy, {"command": command})
        assert final(events)["reason"] == "exited"

    async def verbs() -> dict[str, float]:
        expr = "sum by (verb) (session_proxy_kubernetes_api_request_duration_seconds_count)"
        return by_label(await prometheus.query(http, expr), "verb")

    await prometheus.eventually(verbs, lambda found: {"list", "connect"} <= set(found), "API calls by verb")

    async def empty_panels() -> set[str]:
        return {title for title, expr in panel_queries() if not await prometheus.query(http, expr)}

    # Rates need two scrapes after the execs: wait for them rather than for a fixed time.
    assert await prometheus.eventually(empty_panels, lambda empty: not empty, "panels without data") == set()
    ready = await prometheus.query(http, "session_proxy_workspace_ready")
    assert [float(s["value"][1]) for s in ready] == [1]
