"""Background jobs through Kubernetes, on both API modes, cold and warm: a job holds its own
exec stream (a warm one when the pool has it), and every way it ends takes its whole group."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from session_proxy.keys import JOBS

from .conftest import (
    TOKEN,
    KubeSetup,
    ProxyFactory,
    ProxyProcess,
    RunningProxy,
    exec_events,
    final,
    forking,
    kube_exec,
    kube_proxy,
    output_of,
    path_settings,
    pod_survivors,
    prewarm,
    survivors,
    wait_for_pool,
    wait_for_processes,
)
from .jobs_api import SERVING, JobReader, end_job, fetch_command, http_server, start_job, wait_ended
from .kube_api_server import Fault
from .test_jobs import GET_LOGGED


async def start_kube_job(
    http: aiohttp.ClientSession, setup: KubeSetup, body: dict[str, object]
) -> dict[str, object]:
    """Start a job on the setup's path and prove the path: warm, it opened no exec of its own."""
    if setup.path == "warm":
        await wait_for_pool(setup.proxy, 1)
    job = await start_job(http, setup.proxy.url, body)
    assert job["warm"] is (setup.path == "warm"), job
    assert job["target"] == "default/ws-1/workspace"
    own_agent = f"exec_id={job['job_id']}"
    mine = [r for r in setup.api.exec_requests() if r.headers.get("User-Agent", "").endswith(own_agent)]
    assert len(mine) == (0 if setup.path == "warm" else 1)
    return job


async def test_server_job_answers_while_execs_run(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """A server job in the workspace answers an exec's request while another exec runs; its log
    is read by offset; DELETE ends it and its group (through the kill path), reason killed."""
    url = kube_setup.proxy.url
    job = await start_kube_job(http, kube_setup, {"command": http_server(marker)})
    reader = JobReader(http, url, str(job["job_id"]))
    port = int((await reader.until(SERVING)).group(1))
    gate = kube_setup.pod.root / "gate"
    other = asyncio.create_task(
        exec_events(
            http, kube_setup.proxy, {"command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"]}
        )
    )
    fetched = await kube_exec(http, kube_setup, {"command": fetch_command(f"http://127.0.0.1:{port}/")})
    assert output_of(fetched, "stdout") == b"200\n"
    assert not other.done()
    gate.touch()
    assert final(await other)["exit_code"] == 0
    await reader.until(GET_LOGGED, "stderr")
    ended = await end_job(http, url, str(job["job_id"]))
    assert ended["exit"]["reason"] == "killed"
    assert await survivors(marker, within=10) == []
    assert (await reader.to_end())["reason"] == "killed"


async def test_output_read_in_pieces_is_exact(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """Through the wrapper, output read a few bytes at a time is exactly what an exec gets."""
    script = "i=0; while [ $i -lt 200 ]; do printf 'é€ line %s\\n' $i; printf 'e%s' $i >&2; i=$((i+1)); done"
    whole = await exec_events(http, kube_setup.proxy, {"command": ["sh", "-c", script]})
    job = await start_kube_job(http, kube_setup, {"command": ["sh", "-c", script]})
    reader = JobReader(http, kube_setup.proxy.url, str(job["job_id"]))
    exit_event = await reader.to_end(limit=97)
    assert reader.output["stdout"] == output_of(whole, "stdout")
    assert reader.output["stderr"] == output_of(whole, "stderr")
    assert (exit_event["reason"], exit_event["exit_code"]) == ("exited", 0)


async def test_timeout_ends_the_group(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """Past its timeout a job ends with reason timeout and nothing of it is left."""
    job = await start_kube_job(http, kube_setup, {"command": forking(marker), "timeout": 2})
    document = await wait_ended(http, kube_setup.proxy.url, str(job["job_id"]))
    assert document["exit"]["reason"] == "timeout"
    assert await survivors(marker, within=10) == []


async def test_dropped_pod_is_pod_gone(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """A job whose pod goes away ends with reason pod_gone, its processes gone with it."""
    job = await start_kube_job(http, kube_setup, {"command": forking(marker)})
    await wait_for_processes(marker, 2)
    kube_setup.api.delete_pod("ws-1")
    document = await wait_ended(http, kube_setup.proxy.url, str(job["job_id"]))
    assert (document["exit"]["reason"], document["exit"]["exit_code"]) == ("pod_gone", None)
    assert await survivors(marker, within=10) == []


async def test_shutdown_ends_jobs(http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str) -> None:
    """Stopping the proxy ends its jobs (reason shutdown), nothing left in the workspace."""
    job = await start_kube_job(http, kube_setup, {"command": forking(marker)})
    await wait_for_processes(marker, 2)
    await kube_setup.proxy.server.stop()
    assert await survivors(marker, within=10) == []
    exit_event = kube_setup.proxy.server.exec_app[JOBS].get(str(job["job_id"])).exit
    assert exit_event is not None
    assert exit_event.reason == "shutdown"
    assert json.loads(exit_event.model_dump_json())["exit_code"] is None


IDLE_CUT = 1.5  # seconds without a frame either way before the "load balancer" cuts


async def test_quiet_job_outlives_an_idle_cutter(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A job's exec stream is pinged like an exec's: a job silent for 3 x the idle cut ends on
    its own; through a proxy that pings too rarely the same job is cut (the fault bites)."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    kube.faults.append(Fault(path="/exec", idle_cut=IDLE_CUT, times=-1))
    body = {"command": ["sh", "-c", f"sleep {3 * IDLE_CUT}; echo done"], "timeout": 30}
    for interval, reason in ((0.1, "exited"), (20.0, "transport_lost")):
        proxy = await kube_proxy(
            kube, make_proxy, tmp_path, exec_ping_interval=interval, exec_ping_timeout=40
        )
        job = await start_job(http, proxy.url, body)
        document = await wait_ended(http, proxy.url, str(job["job_id"]))
        assert document["exit"]["reason"] == reason, document


async def test_dead_man_switch_ends_a_job_when_the_proxy_is_killed(
    http: aiohttp.ClientSession, kube: Any, spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path,
    marker: str, exec_path: str,
) -> None:  # fmt: skip
    """SIGKILL the proxy while a job runs: its exec stream dies, the wrapper sees stdin EOF and
    ends the job's group; nothing of the pod's is left."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    config = kube.write_kubeconfig(tmp_path / "kc", TOKEN)
    warm_execs = str(path_settings(exec_path)["warm_execs"])
    proxy = spawn_proxy("--backend", "kubernetes", "--kubeconfig", str(config), "--namespace", "default",
                        "--session-name", "s1", "--warm-execs", warm_execs)  # fmt: skip
    running = RunningProxy(server=None, url=proxy.url, ops_url=proxy.ops_url)  # type: ignore[arg-type]
    await prewarm(http, running, exec_path)
    setup = KubeSetup(kube, running, pod, exec_path)
    await start_kube_job(http, setup, {"command": forking(marker)})
    await wait_for_processes(marker, 2)
    proxy.process.send_signal(signal.SIGKILL)
    assert await survivors(marker) == []
    assert await pod_survivors(pod.uid) == []


async def test_no_workspace_is_refused_like_an_exec(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A job that cannot start (no workspace pod) is refused as /exec is, 503 with Retry-After,
    and no job is left behind."""
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=0)
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
        exec_status, exec_error = response.status, (await response.json())["error"]
    async with http.post(f"{proxy.url}/jobs", json={"command": ["true"]}) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (
            exec_status,
            exec_error["code"],
        )
        assert response.headers["Retry-After"]
    assert exec_status == 503
    async with http.get(f"{proxy.url}/jobs") as response:
        assert (await response.json())["jobs"] == []


async def test_max_jobs_holds(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str
) -> None:
    """Through Kubernetes too, --max-jobs running jobs refuse the next (429 job_limit) while
    execs still run; ending one makes room."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    proxy = await kube_proxy(kube, make_proxy, tmp_path, max_jobs=1, max_concurrent=1)
    first = await start_job(http, proxy.url, {"command": ["sleep", marker]})
    async with http.post(f"{proxy.url}/jobs", json={"command": ["sleep", marker]}) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (429, "job_limit")
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0
    await end_job(http, proxy.url, str(first["job_id"]))
    second = await start_job(http, proxy.url, {"command": ["sleep", marker]})
    await end_job(http, proxy.url, str(second["job_id"]))
    assert await survivors(marker, within=10) == []
