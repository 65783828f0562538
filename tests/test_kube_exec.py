"""Execs through the real proxy and the Kubernetes API test server, on both API server modes."""

from __future__ import annotations

import aiohttp

from .conftest import KubeSetup, exec_events, final, output_of


async def test_streams_and_exit_code(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """stdout and stderr stay apart, markers are stripped, and the exit code is the command's."""
    events = await exec_events(
        http, kube_setup.proxy, {"command": ["sh", "-c", "echo out; echo err >&2; exit 42"]}
    )
    assert events[0]["type"] == "start"
    assert events[0]["target"] == "default/ws-1/workspace"
    assert events[0]["guarantees"] == {"workdir": True, "env": True, "stdin": True, "kill": True}
    assert output_of(events, "stdout") == b"out\n"
    assert output_of(events, "stderr") == b"err\n"
    assert final(events)["exit_code"] == 42
    assert final(events)["reason"] == "exited"
