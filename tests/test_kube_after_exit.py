"""What happens between a command's exit and the end of its request, on the Kubernetes backend:
nothing is waited for when nothing of the command is left, and leftovers' late output is never
cut off when something is."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_proxy.backends.kubernetes import KubernetesBackend
from session_proxy.backends.kubernetes.execution import AfterExit
from session_proxy.metrics import Metrics
from session_proxy.settings import Settings

from .conftest import (
    TOKEN,
    KubeSetup,
    ProxyFactory,
    RunningProxy,
    final,
    kube_exec,
    output_of,
    path_settings,
    prewarm,
    processes_with,
    wait_for_pool,
    warm_pool_state,
)

# Far longer than any test may run: a request that waited on one of them would never end.
ABSURD = 3600.0
# Far below ABSURD, and ample for a loaded machine: the bound the guard holds a request to.
BOUND = 60.0


async def setup_with(
    kube: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    exec_path: str,
    http: aiohttp.ClientSession,
    after_exit: AfterExit,
) -> KubeSetup:
    """A workspace pod and a proxy whose Kubernetes backend waits as ``after_exit`` says."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0", "ops_listen": "127.0.0.1:0", "local_root": tmp_path,
        "kill_grace": 1, "shutdown_grace": 1, "rate_limit": 0, "backend": "kubernetes",
        "kubeconfig": str(kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN)),
        "namespace": "default", "session_name": "s1", "workspace_wait": 3,
        **path_settings(exec_path),
    }  # fmt: skip
    backend = KubernetesBackend(Settings.model_validate(values), Metrics(), after_exit)
    proxy: RunningProxy = await make_proxy(exec_backend=backend, **values)
    await prewarm(http, proxy, exec_path)
    return KubeSetup(kube, proxy, pod, exec_path)


def guard_body(kind: str, gate: Path, marker: str) -> dict[str, Any]:
    """A command that leaves nothing in its group: `true`; `cat` fed stdin; and one whose
    detached child (its own session, waited for until it is there) keeps the stream's pipes
    open, so only the exit report can end the request before that child does."""
    if kind == "true":
        return {"command": ["true"]}
    if kind == "cat-with-stdin":
        return {"command": ["cat"], "stdin": "in"}
    detach = f"setsid sh -c 'touch {gate}; exec sleep {marker}' & while [ ! -e {gate} ]; do sleep 0.01; done"
    return {"command": ["sh", "-c", f"rm -f {gate}; {detach}"]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["true", "cat-with-stdin", "detached-holder"])
async def test_nothing_left_means_no_wait_after_the_exit(
    kube: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    exec_path: str,
    http: aiohttp.ClientSession,
    kind: str,
    marker: str,
) -> None:
    """With the drain's quiet spell and limit and the wrapper's leftover grace all set to an
    hour, a command that leaves nothing in its group still ends its request at once: nothing
    between its exit and the exit event waits on any of them, nor on a detached process that
    still holds the stream open."""
    after_exit = AfterExit(drain_quiet=ABSURD, drain_limit=ABSURD, leftover_grace=int(ABSURD))
    setup = await setup_with(kube, make_proxy, tmp_path, exec_path, http, after_exit)
    body = guard_body(kind, tmp_path / "detached", marker)
    for _ in range(3):
        async with asyncio.timeout(BOUND):
            events = await kube_exec(http, setup, body)
        assert final(events)["reason"] == "exited", events
        assert final(events)["exit_code"] == 0
        assert output_of(events, "stdout") == body.get("stdin", "").encode()
    for process in processes_with(marker):  # detached on purpose: not the proxy's to end
        process.kill()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("command", "late"),
    [
        (["sh", "-c", "(sleep 0.02; echo late) &"], b"late\n"),
        (["bash", "-c", "echo hi > >(sleep 0.01; cat)"], b"hi\n"),
        (["sh", "-c", "echo now; (sleep 0.02; echo late >&2) &"], b"late\n"),
    ],
    ids=["background-child", "process-substitution", "stderr"],
)
async def test_late_output_of_what_is_left_is_delivered(
    kube: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    exec_path: str,
    http: aiohttp.ClientSession,
    command: list[str],
    late: bytes,
) -> None:
    """Output that what the command left in its group writes after the exit still reaches the
    client: the exit report says the group is not empty, so the request drains until the
    stream ends (the quiet spell is long here, so the load on the machine cannot cut it)."""
    setup = await setup_with(
        kube, make_proxy, tmp_path, exec_path, http, AfterExit(drain_quiet=BOUND / 2, drain_limit=BOUND)
    )
    for _ in range(3):
        events = await kube_exec(http, setup, {"command": command})
        assert final(events)["reason"] == "exited", events
        assert output_of(events, "stdout") + output_of(events, "stderr") in (late, b"now\n" + late), events


@pytest.mark.timeout(120)
async def test_a_taken_warm_exec_is_replaced_after_its_request(
    kube: Any, make_proxy: ProxyFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """While a request runs on a warm exec (the pool not empty), no replacement opens: its
    handshake and spawn would compete with the command. It opens once the request has ended."""
    setup = await setup_with(kube, make_proxy, tmp_path, "warm", http, AfterExit())
    gate = tmp_path / "gate"
    body = {"command": ["sh", "-c", f"echo running; while [ ! -e {gate} ]; do sleep 0.01; done"]}
    opens_before = warm_opens(kube)
    async with http.post(f"{setup.proxy.url}/exec", json=body) as response:
        assert json.loads(await response.content.readline())["warm"] is True
        assert b"running" in await response.content.readline()
        seen = [await warm_pool_state(setup.proxy) for _ in range(20)]  # the keeper ran between
        gate.touch()
        await response.read()
    assert {(state["ready"], state["opening"]) for state in seen} == {(1, 0)}, seen
    assert warm_opens(kube) == opens_before
    await wait_for_pool(setup.proxy, 2)
    assert warm_opens(kube) == opens_before + 1


def warm_opens(api: Any) -> int:
    return sum("warm_exec=" in r.headers.get("User-Agent", "") for r in api.exec_requests())
