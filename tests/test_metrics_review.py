"""The metrics follow Prometheus conventions on a real scrape, and the latency histograms count
what really happened (exec starts, Kubernetes API calls by verb)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import KubeSetup, ProxyFactory, RunningProxy, exec_events, final, kube_exec


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool (Debian package prometheus) is required; .ci/run installs it"
    return path


async def scrape(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        assert response.status == 200
        return await response.text()


def counts(text: str, name: str, label: str) -> dict[str, float]:
    """``name``'s samples by the value of ``label``."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels[label]] = sample.value
    return found


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


@pytest.mark.timeout(60)
async def test_local_scrape_passes_promtool(http: aiohttp.ClientSession, make_proxy: ProxyFactory) -> None:
    """`promtool check metrics` finds nothing to say about a real scrape after a few execs."""
    proxy = await make_proxy()
    await exec_events(http, proxy, {"command": ["sh", "-c", "echo out; echo err >&2"]})
    await exec_events(http, proxy, {"command": ["sleep", "5"], "timeout": 0.1})
    result = check_metrics(await scrape(http, proxy))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.timeout(60)
def test_promtool_check_metrics_can_fail() -> None:
    """The check is not blind: a counter whose name lacks `_total` is reported."""
    result = check_metrics(
        "# HELP session_proxy_execs Execs.\n# TYPE session_proxy_execs counter\nsession_proxy_execs 1\n"
    )
    assert result.returncode != 0
    assert "_total" in result.stdout + result.stderr


def verbs_seen(setup: KubeSetup) -> dict[str, float]:
    """The API requests the test server received, by the verb the proxy should report."""
    seen: dict[str, float] = {}
    for request in setup.api.requests:
        segments = request.path.rstrip("/").count("/")
        verb = "connect" if request.path.endswith("/exec") else "list" if segments == 5 else "get"
        seen[verb] = seen.get(verb, 0) + 1
    return seen


@pytest.mark.timeout(60)
async def test_kubernetes_scrape_passes_promtool_and_times_api_calls_by_verb(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """On the kubernetes backend the API latency histogram has one observation per API request
    the server saw, by verb (list, get, connect), and the scrape passes `promtool check metrics`."""
    events = await kube_exec(http, kube_setup, {"command": ["sh", "-c", "echo hi"]})
    assert final(events)["exit_code"] == 0
    # A leftover-process kill may still be under way: poll until the figures settle.
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        text = await scrape(http, kube_setup.proxy)
        observed = counts(text, "session_proxy_kubernetes_api_request_duration_seconds_count", "verb")
        expected = verbs_seen(kube_setup)
        if observed == expected or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert observed == expected
    result = check_metrics(text)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    assert {"list", "connect"} <= set(observed)
    starts = counts(text, "session_proxy_exec_start_latency_seconds_count", "path")
    # On the warm path the pool was opened by a first (cold) request; this one started warm.
    assert starts == ({"cold": 1.0, "warm": 0.0} if kube_setup.path == "cold" else {"cold": 1.0, "warm": 1.0})
