"""What the proxy knows of an image's tools holds for that image only, not for the pod."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from session_proxy.backends.kubernetes.discovery import CACHE_SECONDS

from .conftest import ProxyFactory, exec_events, final, image_without_setsid, kube_proxy

LABELS = {"session": "s1", "type": "workspace"}
ALL_TOOLS = {"workdir": True, "env": True, "stdin": True, "kill": True, "runner": "shell"}


async def test_a_new_image_on_the_same_pod_is_probed_again(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """After ``kubectl set image`` (same pod and uid, another image lacking setsid) the next
    exec probes the new image and its start event says the kill guarantee is gone."""
    pod = kube.add_pod("ws-1", labels=LABELS)
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    events = await exec_events(http, proxy, {"command": ["true"]})
    assert events[0]["guarantees"] == ALL_TOOLS
    pod.image = "example.com/user/tools:2.0"
    pod.path = image_without_setsid(tmp_path)
    # The proxy keeps its answer to "which pod" for CACHE_SECONDS: what is waited for here is
    # that much time itself (a lower bound, so a slow machine only waits longer), not an event.
    await asyncio.sleep(CACHE_SECONDS + 0.1)
    events = await exec_events(http, proxy, {"command": ["sh", "-c", "echo hi"]})
    assert final(events)["exit_code"] == 0
    assert events[0]["guarantees"] == {**ALL_TOOLS, "kill": False}
