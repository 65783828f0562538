"""What only the workspace supervisor does through Kubernetes: it ends processes that left the
command's session, and it gives every guarantee in an image without a shell."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import (
    KubeSetup,
    ProxyFactory,
    exec_events,
    final,
    kube_exec,
    kube_proxy,
    output_of,
    processes_with,
    survivors,
    wait_for_processes,
)


def escaping(marker: str) -> list[str]:
    """A command whose grandchild double-forks into a session of its own, and then sleeps."""
    return ["sh", "-c", f"(setsid sleep {marker} >/dev/null 2>&1 </dev/null &); echo started; sleep {marker}"]


async def wait_for_escape(marker: str) -> None:
    """Until the two sleepers run in two sessions: one has left the command's."""
    await wait_for_processes(marker, 2)
    deadline = asyncio.get_running_loop().time() + 10
    while len({os.getsid(p.pid) for p in processes_with(marker)}) < 2:
        assert asyncio.get_running_loop().time() < deadline, "no sleeper left the command's session"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("runner", ["supervisor"])
async def test_escaped_child_is_ended_on_timeout(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """At the timeout a double-forked child in its own session is ended with the command."""
    events = await kube_exec(http, kube_setup, {"command": escaping(marker), "timeout": 2})
    assert output_of(events, "stdout") == b"started\n"
    assert final(events)["reason"] == "timeout"
    assert await survivors(marker) == []


@pytest.mark.parametrize("runner", ["supervisor"])
async def test_escaped_child_is_ended_on_disconnect(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, marker: str
) -> None:
    """A client that hangs up leaves nothing running, the escaped child included."""
    response = await http.post(
        f"{kube_setup.proxy.url}/exec", json={"command": escaping(marker), "timeout": 60}
    )
    start = json.loads(await response.content.readline())
    assert start["guarantees"]["runner"] == "supervisor"
    await wait_for_escape(marker)
    response.close()
    assert await survivors(marker) == []


def image_without_shell(tmp_path: Path, programs: tuple[str, ...]) -> str:
    """An "image" whose PATH holds the named programs and nothing else: no shell at all."""
    bin_dir = tmp_path / "shell-less-image" / "bin"
    bin_dir.mkdir(parents=True)
    for program in programs:
        target = shutil.which(program)
        assert target
        (bin_dir / program).symlink_to(target)
    return str(bin_dir)


@pytest.mark.parametrize("exec_path", ["cold", "warm"])
async def test_image_without_shell_keeps_every_guarantee(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path, marker: str,
    exec_path: str,
) -> None:  # fmt: skip
    """A pod whose image has no /bin/sh (and only the programs it runs) still gets workdir,
    env, stdin and kill from the supervisor, on cold and warm execs."""
    from .conftest import path_settings, prewarm, runner_settings

    pod = kube.add_pod(
        "ws-1", labels={"session": "s1", "type": "workspace"}, shell="/nonexistent/sh",
        path=image_without_shell(tmp_path, ("cat", "printenv", "pwd", "sleep", "true")),
    )  # fmt: skip
    settings = {**path_settings(exec_path), **runner_settings("supervisor", tmp_path)}
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=3, **settings)
    await prewarm(http, proxy, exec_path)
    setup = KubeSetup(kube, proxy, pod, exec_path, "supervisor")
    workdir = pod.root / "work"
    workdir.mkdir()
    events = await kube_exec(http, setup, {"command": ["pwd"], "workdir": str(workdir)})
    assert events[0]["guarantees"] == {
        "workdir": True, "env": True, "stdin": True, "kill": True, "runner": "supervisor"
    }  # fmt: skip
    assert output_of(events, "stdout") == f"{workdir}\n".encode()
    events = await kube_exec(http, setup, {"command": ["printenv", "GREETING"], "env": {"GREETING": "hi"}})
    assert output_of(events, "stdout") == b"hi\n"
    events = await kube_exec(http, setup, {"command": ["cat"], "stdin": "exactly this"})
    assert output_of(events, "stdout") == b"exactly this"
    events = await kube_exec(http, setup, {"command": ["sleep", marker], "timeout": 1})
    assert final(events)["reason"] == "timeout"
    assert await survivors(marker) == []
    events = await exec_events(http, proxy, {"command": ["no-such-program"]})
    assert (final(events)["reason"], final(events)["exit_code"]) == ("error", 127)
