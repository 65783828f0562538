"""`GET /logs?tail=N`: the workspace container's last N lines on Kubernetes (0 to 10000, default
100), a clear 422 for any other tail, and a JSON 404 on the local backend, which has no log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import KubeSetup, ProxyFactory, RunningProxy, kube_proxy

BAD_TAILS = ["-1", "10001", "abc", "1.5", "", "0x10", "1e3", " 5"]


def log_requests(kube: Any) -> list[Any]:
    return [r for r in kube.requests if r.path.endswith("/log")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("query", ["", "?tail=5", "?tail=0"])
async def test_local_backend_has_no_log(http: aiohttp.ClientSession, proxy: RunningProxy, query: str) -> None:
    """The local backend answers a valid /logs with a JSON 404 that says /logs is for Kubernetes."""
    async with http.get(f"{proxy.url}/logs{query}") as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert error["code"] == "not_found"
    assert "kubernetes backend" in error["message"]


async def tail_refusal(http: aiohttp.ClientSession, url: str, tail: str) -> dict[str, Any]:
    """GET /logs with this tail, which must be refused with 422 naming `tail`; the error."""
    async with http.get(f"{url}/logs", params={"tail": tail}) as response:
        assert response.status == 422
        error: dict[str, Any] = (await response.json())["error"]
    assert [f["field"] for f in error["fields"]] == ["tail"]
    return error


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tail", BAD_TAILS)
async def test_bad_tail_is_422_on_the_local_backend(
    http: aiohttp.ClientSession, proxy: RunningProxy, tail: str
) -> None:
    """A tail that is not a whole number from 0 to 10000 is refused with 422 naming `tail`."""
    error = await tail_refusal(http, proxy.url, tail)
    assert error["code"] == "invalid_request"
    assert "0" in error["message"]
    assert "10000" in error["message"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api_mode", ["modern"])
@pytest.mark.parametrize("tail", BAD_TAILS)
async def test_bad_tail_never_reaches_the_api_server(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, tail: str
) -> None:
    """On Kubernetes a bad tail is refused with 422 before any log request is made."""
    await tail_refusal(http, kube_setup.proxy.url, tail)
    assert log_requests(kube_setup.api) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api_mode", ["modern"])
@pytest.mark.parametrize(
    ("query", "lines"), [("", 100), ("?tail=0", 0), ("?tail=7", 7), ("?tail=10000", 10000)]
)
async def test_tail_asks_for_that_many_lines(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, query: str, lines: int
) -> None:
    """A tail from 0 to 10000 (100 when absent) is asked of the API server as tailLines, and
    the container's last lines come back as text/plain."""
    kube_setup.pod.log_lines = [f"line {i}" for i in range(12_000)]
    async with http.get(f"{kube_setup.proxy.url}/logs{query}") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    assert text == "".join(f"line {i}\n" for i in range(12_000 - lines, 12_000))
    (request,) = log_requests(kube_setup.api)
    assert dict(request.query)["tailLines"] == str(lines)
    assert dict(request.query)["container"] == "workspace"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api_mode", ["modern"])
async def test_logs_without_a_workspace_pod_is_503(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """No workspace pod to read from: 503 workspace_not_found with Retry-After, as JSON."""
    kube.add_pod("other", labels={"session": "s2", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    async with http.get(f"{proxy.url}/logs") as response:
        assert response.status == 503
        assert response.headers["Retry-After"]
        assert (await response.json())["error"]["code"] == "workspace_not_found"
    assert log_requests(kube) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api_mode", ["modern"])
async def test_logs_forbidden_is_502_quoting_the_api_server(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """RBAC denying pods/log: 502 backend_error carrying the API server's status and message."""
    kube_setup.api.forbidden.add(("get", "pods/log"))
    async with http.get(f"{kube_setup.proxy.url}/logs?tail=5") as response:
        assert response.status == 502
        error = (await response.json())["error"]
    assert error["code"] == "backend_error"
    assert "403" in error["message"]
    assert "pods/log" in error["message"]
    assert len(log_requests(kube_setup.api)) == 1
