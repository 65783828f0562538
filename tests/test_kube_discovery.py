"""Workspace discovery, credentials and API faults map to clear, distinct answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import (
    TOKEN,
    ProxyFactory,
    RunningProxy,
    exec_events,
    final,
    kube_proxy,
    output_of,
    survivors,
    wait_for_processes,
)
from .kube_api_server import Fault, kill_pod_processes

LABELS = {"session": "s1", "type": "workspace"}


async def refusal(http: aiohttp.ClientSession, proxy: RunningProxy) -> tuple[int, dict[str, Any], str | None]:
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
        return response.status, (await response.json())["error"], response.headers.get("Retry-After")


async def first_refusal(
    http: aiohttp.ClientSession, proxy: RunningProxy, within: float = 15
) -> tuple[int, dict[str, Any]]:
    """Exec `true` until a request is refused (the discovery cache has run out); that refusal."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
            if response.status != 200:
                return response.status, (await response.json())["error"]
            await response.read()
    raise AssertionError(f"no request was refused within {within} s")


async def test_no_workspace_pod(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """No matching pod: 503 workspace_not_found with Retry-After, naming the selector."""
    kube.add_pod("other", labels={"session": "s2", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=0)
    status, error, retry = await refusal(http, proxy)
    assert (status, error["code"]) == (503, "workspace_not_found")
    assert "session=s1,type=workspace" in error["message"]
    assert retry is not None


async def test_several_workspace_pods(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Two usable matching pods: refused as ambiguous, naming both."""
    kube.add_pod("ws-a", labels=LABELS)
    kube.add_pod("ws-b", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    status, error, _ = await refusal(http, proxy)
    assert (status, error["code"]) == (503, "workspace_ambiguous")
    assert "ws-a" in error["message"]
    assert "ws-b" in error["message"]


async def test_terminating_pod(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A pod being deleted is not used: 503 workspace_terminating."""
    kube.add_pod("ws-1", labels=LABELS, deleting=True)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=0)
    status, error, _ = await refusal(http, proxy)
    assert (status, error["code"]) == (503, "workspace_terminating")


async def test_wrong_owner_is_refused(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """With an owner configured, a pod owned by someone else is refused (403) saying why."""
    owner = {
        "apiVersion": "example.com/v1",
        "kind": "Session",
        "name": "other",
        "uid": "u-2",
        "controller": True,
    }
    kube.add_pod("ws-1", labels=LABELS, owner_references=[owner])
    proxy = await kube_proxy(
        kube, make_proxy, tmp_path, owner_kind="Session", owner_api_group="example.com", owner_name="s1"
    )
    status, error, _ = await refusal(http, proxy)
    assert (status, error["code"]) == (403, "workspace_owner_mismatch")
    assert "not owned by Session 's1'" in error["message"]


async def test_right_owner_is_accepted(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A pod owned by the configured Session (group, name and uid) is used."""
    owner = {
        "apiVersion": "example.com/v1",
        "kind": "Session",
        "name": "s1",
        "uid": "u-1",
        "controller": True,
    }
    kube.add_pod("ws-1", labels=LABELS, owner_references=[owner])
    proxy = await kube_proxy(
        kube, make_proxy, tmp_path, owner_kind="Session", owner_api_group="example.com",
        owner_name="s1", owner_uid="u-1",
    )  # fmt: skip
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0


async def echo_ran_starting(
    http: aiohttp.ClientSession, proxy: RunningProxy, pod: Any
) -> list[dict[str, Any]]:
    """Exec `echo ran`, making the pod running and ready once the request is seen waiting."""
    events = []
    async with http.post(f"{proxy.url}/exec", json={"command": ["echo", "ran"]}) as response:
        async for line in response.content:
            events.append(json.loads(line))
            if events[-1]["type"] == "waiting":  # the request is waiting: now the pod starts
                pod.phase, pod.ready, pod.container_running = "Running", True, True
    return events


async def test_waits_for_a_starting_pod_with_waiting_events(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A request during image pull streams `waiting` events with the reason, then runs as soon
    as the pod watch reports it ready."""
    pod = kube.add_pod("ws-1", labels=LABELS, phase="Pending", ready=False, container_running=False,
                       waiting_reason="ImagePullBackOff")  # fmt: skip
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=20)
    events = await echo_ran_starting(http, proxy, pod)
    assert events[0]["type"] == "waiting"
    assert "ImagePullBackOff" in events[0]["message"]
    assert [e["type"] for e in events].index("start") > 0
    assert output_of(events, "stdout") == b"ran\n"
    # It waited on a pod watch from the list's version, not by listing again and again.
    pod_requests = [dict(r.query) for r in kube.requests if r.path.endswith("/pods")]
    assert [q.get("watch") for q in pod_requests][:2] == [None, "true"], pod_requests
    assert len([q for q in pod_requests if "watch" not in q]) == 1, pod_requests
    assert pod_requests[1]["resourceVersion"].isdigit()


async def test_expired_watch_version_lists_again(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A watch answered with 410 Expired (its version compacted away) makes the proxy list
    again, so the pod becoming ready is still seen."""
    pod = kube.add_pod("ws-1", labels=LABELS, ready=False)
    kube.history.compacted = 10**9  # every watch finds its version expired
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=8)
    events = await echo_ran_starting(http, proxy, pod)
    assert output_of(events, "stdout") == b"ran\n"
    lists = [r for r in kube.requests if r.path.endswith("/pods") and ("watch", "true") not in r.query]
    assert len(lists) >= 2


async def test_role_without_watch_falls_back_to_polling(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A Role that does not grant `watch` on pods still lets a request wait for a starting pod:
    the proxy lists again instead."""
    pod = kube.add_pod("ws-1", labels=LABELS, ready=False)
    kube.forbidden.add(("watch", "pods"))
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=20)
    events = await echo_ran_starting(http, proxy, pod)
    assert output_of(events, "stdout") == b"ran\n"
    assert final(events)["exit_code"] == 0


async def test_not_ready_after_the_wait_is_503(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A pod that stays unready: after the wait, the stream ends in an error exit saying why."""
    kube.add_pod("ws-1", labels=LABELS, ready=False)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=1.5)
    events = await exec_events(http, proxy, {"command": ["true"]})
    assert events[0]["type"] == "waiting"
    assert final(events)["reason"] == "error"
    assert "not Ready" in final(events)["message"]


async def test_recreated_pod_is_found_again(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """After the pod is deleted and re-created (new uid), the next exec reaches the new one."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0
    kube.delete_pod("ws-1")
    new = kube.add_pod("ws-2", labels=LABELS)
    status, error = await first_refusal(http, proxy)  # the cached pod is gone: found out, forgotten
    assert (status, error["code"]) == (503, "workspace_not_found")
    events = await exec_events(http, proxy, {"command": ["pwd"]})
    assert events[0]["target"] == "default/ws-2/workspace"
    assert output_of(events, "stdout") == f"{new.root}\n".encode()


async def test_pod_deleted_mid_exec_is_pod_gone(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """Deleting the pod under a running exec ends it with reason pod_gone, not an exit code."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    task = asyncio.create_task(exec_events(http, proxy, {"command": ["sleep", marker]}))
    await wait_for_processes(marker, 1)
    kube.delete_pod("ws-1")
    exit_event = final(await task)
    assert exit_event["reason"] == "pod_gone"
    assert exit_event["exit_code"] is None


async def test_terminating_pod_mid_exec_is_pod_gone(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """A pod that starts terminating under a running exec (its processes killed, the pod object
    still there with a deletionTimestamp) ends the exec with pod_gone, not an exit code."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    task = asyncio.create_task(exec_events(http, proxy, {"command": ["sleep", marker]}))
    await wait_for_processes(marker, 1)
    pod.deleting = True
    kill_pod_processes(pod.uid)  # the runtime stops the containers
    exit_event = final(await task)
    assert (exit_event["reason"], exit_event["exit_code"]) == ("pod_gone", None)
    assert "terminating" in exit_event["message"]


async def test_workspace_ready_gauge_follows_the_pod(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """session_proxy_workspace_ready reads 1 while the pod is usable and 0 once it is not (each
    scrape asks the backend afresh)."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)

    async def gauge() -> str:
        async with http.get(f"{proxy.ops_url}/metrics") as response:
            lines = (await response.text()).splitlines()
        return next(line for line in lines if line.startswith("session_proxy_workspace_ready "))

    assert await gauge() == "session_proxy_workspace_ready 1.0"
    pod.ready = False
    assert await gauge() == "session_proxy_workspace_ready 0.0"
    pod.ready = True
    assert await gauge() == "session_proxy_workspace_ready 1.0"


async def test_not_ready_mid_exec_lets_the_exec_finish(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A pod turning NotReady does not cut a running exec short; new execs then wait."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=0)
    gate = pod.root / "go"
    task = asyncio.create_task(
        exec_events(
            http,
            proxy,
            {"command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done; echo finished"]},
        )
    )
    await wait_for_processes(str(gate), 1)  # the command runs
    pod.ready = False
    status, error = await first_refusal(http, proxy)  # once the discovery cache has run out
    assert (status, error["code"]) == (503, "workspace_not_ready")
    gate.touch()
    events = await task
    assert output_of(events, "stdout") == b"finished\n"
    assert final(events)["exit_code"] == 0


async def test_dropped_stream_is_transport_lost(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """A stream cut mid-output without status is transport_lost, never exit 0, and the kill still runs."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0  # probe done
    kube.faults.append(Fault(path="/exec", drop_after_bytes=100_000))
    script = f"sleep {marker} & while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
    events = await exec_events(http, proxy, {"command": ["sh", "-c", script], "timeout": 30})
    exit_event = final(events)
    assert exit_event["reason"] == "transport_lost"
    assert exit_event["exit_code"] is None
    assert "before the command reported its exit" in exit_event["message"]
    assert await survivors(marker) == []


async def test_api_server_5xx_is_503(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An API server answering 500 to the pod list gives 503 api_unavailable with Retry-After."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    kube.faults.append(Fault(path="/pods", status=500, times=-1, method="GET"))
    status, error, retry = await refusal(http, proxy)
    assert (status, error["code"]) == (503, "api_unavailable")
    assert retry == "5"
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        assert 'session_proxy_kubernetes_api_errors_total{kind="5xx"}' in await response.text()


async def test_slow_api_server_times_out_clearly(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An API server slower than --api-timeout is reported as unavailable, not hung on."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, api_timeout=0.5)
    kube.faults.append(Fault(path="/pods", delay=3, times=1))
    status, error, _ = await refusal(http, proxy)
    assert (status, error["code"]) == (503, "api_unavailable")


async def test_forbidden_exec_is_a_clear_error(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """RBAC denying pods/exec gives 502 with a message naming the missing permission."""
    kube.add_pod("ws-1", labels=LABELS)
    kube.forbidden.add(("get", "pods/exec"))
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    status, error, _ = await refusal(http, proxy)
    assert (status, error["code"]) == (502, "backend_error")
    assert "pods/exec" in error["message"]


async def test_forbidden_list_is_a_clear_error(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """RBAC denying the pod list gives 502 quoting the API server's Forbidden message."""
    kube.add_pod("ws-1", labels=LABELS)
    kube.forbidden.add(("list", "pods"))
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    status, error, _ = await refusal(http, proxy)
    assert status == 502
    assert "cannot list resource" in error["message"]


async def test_bad_token_is_a_clear_error(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A token the API server rejects (401) is reported as such, and /readyz turns 503."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    kube.tokens.clear()
    status, error, _ = await refusal(http, proxy)
    assert status == 502
    assert "401" in error["message"]
    async with http.get(f"{proxy.ops_url}/readyz") as response:
        assert response.status == 503


@pytest.fixture
def in_cluster(kube: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """In-cluster credentials: API server from the service env vars, token and CA from files."""
    host, port = kube.url.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return {
        "backend": "kubernetes", "token_file": str(token_file),
        "ca_file": str(kube.write_ca(tmp_path / "ca.crt")),
        "namespace": "default", "session_name": "s1", "workspace_wait": 1, "kill_grace": 1,
    }  # fmt: skip


async def test_token_rotation_mid_session(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, in_cluster: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The kubelet rotates the token file and the old token stops working: the proxy re-reads
    the file on the 401 and goes on; the token never shows in logs, events or metrics."""
    caplog.set_level("DEBUG")
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await make_proxy(**in_cluster)
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0
    Path(in_cluster["token_file"]).write_text("token-b-rotated\n")
    kube.tokens.clear()
    kube.add_token("token-b-rotated")
    rotated_at = len(kube.requests)
    events = await exec_events(http, proxy, {"command": ["echo", "after rotation"]})
    assert output_of(events, "stdout") == b"after rotation\n"
    # On the warm path the command ran on an exec opened before the rotation; the pool's refill
    # is what meets the 401: wait in the request log for its retry with the file's new token.
    async with asyncio.timeout(20):
        while "Bearer token-b-rotated" not in [
            r.headers.get("Authorization") for r in kube.requests[rotated_at:]
        ]:
            await asyncio.sleep(0.02)
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        metrics = await response.text()
    async with http.get(f"{proxy.url}/status") as response:
        status_text = await response.text()
    workspace_env = await exec_events(http, proxy, {"command": ["env"]})
    assert final(workspace_env)["exit_code"] == 0
    for text in (metrics, status_text, json.dumps(events), caplog.text, json.dumps(workspace_env)):
        assert "token-b" not in text
        assert TOKEN not in text
        assert "Bearer " not in text


def test_token_file_is_reread_every_minute(tmp_path: Path) -> None:
    """The token file is read again once a minute has passed (and not before), at once after
    expire() (a 401), and an unreadable file keeps the previous token."""
    from session_proxy.backends.kubernetes.credentials import TokenFile

    now = [1000.0]
    path = tmp_path / "token"
    path.write_text("first\n")
    token = TokenFile(str(path), clock=lambda: now[0])
    assert token.current() == "first"
    path.write_text("second\n")
    now[0] += 59.9
    assert token.current() == "first"
    now[0] += 0.1
    assert token.current() == "second"
    path.write_text("third\n")
    token.expire()
    assert token.current() == "third"
    path.unlink()
    now[0] += 60
    assert token.current() == "third"


async def test_in_cluster_without_service_host_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_proxy: ProxyFactory
) -> None:
    """Outside a cluster with no kubeconfig, start-up fails with a message saying what to do."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    from session_proxy.app import StartupFailed

    with pytest.raises(StartupFailed, match="--kubeconfig"):
        await make_proxy(backend="kubernetes", session_name="s1", kubeconfig=None)


async def test_plain_http_api_server(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The backend also works against an API server over plain HTTP (a kubeconfig without a CA)."""
    from .kube_api_server import KubeApiServer

    (tmp_path / "plain").mkdir()
    server = KubeApiServer(tmp_path / "plain", tls=False)
    server.add_token(TOKEN)
    server.add_pod("ws-1", labels=LABELS)
    await server.start()
    try:
        assert server.url.startswith("http://")
        proxy = await kube_proxy(server, make_proxy, tmp_path)
        events = await exec_events(http, proxy, {"command": ["echo", "plain"]})
        assert output_of(events, "stdout") == b"plain\n"
    finally:
        await proxy.server.stop()
        await server.stop()


async def test_hung_exec_handshake_is_bounded(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An API server that does not answer the exec upgrade in --api-timeout gives 503 (without
    the bound the delayed handshake would succeed and answer 200)."""
    kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path, api_timeout=0.5)
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0
    kube.faults.append(Fault(path="/exec", delay=5, times=1))
    status, error, _ = await refusal(http, proxy)
    assert (status, error["code"]) == (503, "api_unavailable")


async def test_container_lost_after_discovery(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The pod says its container runs but the kubelet cannot find it: a clear not-ready answer
    (v4: HTTP 500 at the upgrade; v5: a status after it), never "no /bin/sh" or a fake exit;
    once the container is back, execs run again."""
    pod = kube.add_pod("ws-1", labels=LABELS, container_gone=True)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    status, error, retry = await refusal(http, proxy)
    assert (status, error["code"]) == (503, "workspace_not_ready")
    assert "not found" in error["message"]
    assert retry is not None
    pod.container_gone = False
    events = await exec_events(http, proxy, {"command": ["echo", "back"]})
    assert events[0]["guarantees"]["kill"] is True  # the image was not taken for shell-less
    assert output_of(events, "stdout") == b"back\n"
    pod.container_gone = True  # lost again, after the image probe is cached
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
        body = await response.text()
    if kube.mode == "old":
        assert response.status == 503
    else:
        exit_event = json.loads(body.splitlines()[-1])
        assert (exit_event["reason"], exit_event["exit_code"]) == ("error", None)
        assert "container not found" in exit_event["message"]
