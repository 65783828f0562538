"""Admission: the concurrency cap and the rate limit answer 429 with Retry-After, and recover."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from session_proxy.keys import ADMISSION

from .conftest import (
    ProxyFactory,
    RunningProxy,
    eventually,
    exec_events,
    final,
    forking,
    processes_with,
    survivors,
    wait_for_processes,
)


async def test_concurrency_cap_refuses_at_once(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """With max_concurrent=2 and two execs running, a third gets 429 concurrency_limit."""
    proxy = await make_proxy(max_concurrent=2)
    body = {"command": ["sleep", marker], "timeout": 60}
    responses = [await http.post(f"{proxy.url}/exec", json=body) for _ in range(2)]
    await wait_for_processes(marker, 2)
    async with http.post(f"{proxy.url}/exec", json=body) as refused:
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "1"
        error = (await refused.json())["error"]
        assert error["code"] == "concurrency_limit"
        assert "--max-concurrent" in error["message"]
    for response in responses:
        response.close()
    assert await survivors(marker) == []


async def test_slots_come_back_after_disconnects(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """After many clients hang up mid-exec, the in-flight count is 0 and new execs run."""
    proxy = await make_proxy(max_concurrent=3)
    for _ in range(20):
        response = await http.post(f"{proxy.url}/exec", json={"command": ["sleep", marker], "timeout": 60})
        assert json.loads(await response.content.readline())["type"] == "start"
        response.close()

        async def slot_free() -> bool:
            async with http.get(f"{proxy.ops_url}/metrics") as metrics:
                return "session_proxy_exec_in_flight 0.0" in await metrics.text()

        # The hang-up reaches the proxy a moment later; a request sent before that finds the cap.
        await eventually(slot_free, "the hung-up exec's slot came back")
    assert await survivors(marker) == []
    async with http.get(f"{proxy.ops_url}/metrics") as metrics:
        text = await metrics.text()
    assert 'session_proxy_exec_requests_total{outcome="client_gone"} 20.0' in text
    events = await exec_events(http, proxy, {"command": ["true"]})
    assert final(events)["exit_code"] == 0


async def test_rate_limit_refuses_bursts_with_retry_after(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """Past the burst, with no wait allowed, requests get 429 rate_limited and Retry-After.

    One token per 100 s: no token can come back while the test runs, however slow the machine.
    """
    proxy = await make_proxy(rate_limit=0.01, rate_burst=3, rate_limit_wait=0)
    statuses = []
    for _ in range(5):
        async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
            statuses.append(response.status)
            if response.status == 429:
                assert response.headers["Retry-After"] == "100"
                assert (await response.json())["error"]["code"] == "rate_limited"
            else:
                await response.read()
    assert statuses == [200, 200, 200, 429, 429]
    async with http.get(f"{proxy.ops_url}/metrics") as metrics:
        assert 'session_proxy_rejections_total{reason="rate_limited"} 2.0' in await metrics.text()


async def test_rate_limit_short_wait_absorbs_a_small_burst(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """Over the burst, a request waits for the next token instead of being refused, then runs.

    Three requests at once with a burst of one and a token per second: at least one of them
    must have waited (the limiter counts it), and all three run.
    """
    proxy = await make_proxy(rate_limit=1, rate_burst=1, rate_limit_wait=10)
    requests = [exec_events(http, proxy, {"command": ["true"]}) for _ in range(3)]
    for events in await asyncio.gather(*requests):
        assert final(events)["exit_code"] == 0
    assert proxy.server.exec_app[ADMISSION].rate_waits >= 1


async def test_slot_is_held_until_the_group_is_gone(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, marker: str
) -> None:
    """A client that hangs up does not free its slot while its TERM-ignoring group still lives
    (TERM, grace, KILL): a new exec gets 429 until the group is gone, then runs."""
    proxy = await make_proxy(max_concurrent=1, kill_grace=5)
    body = {"command": forking(marker, "trap '' TERM; "), "timeout": 60}
    response = await http.post(f"{proxy.url}/exec", json=body)
    assert json.loads(await response.content.readline())["type"] == "start"
    await wait_for_processes(marker, 2)
    response.close()
    while 'outcome="client_gone"} 1.0' not in await metrics_text(http, proxy):
        await asyncio.sleep(0.01)  # the request is over; its group is in its kill grace
    assert processes_with(marker)
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as refused:
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "concurrency_limit"
    assert await survivors(marker) == []
    while proxy.server.exec_app[ADMISSION].active:
        await asyncio.sleep(0.01)
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0


async def metrics_text(http: aiohttp.ClientSession, proxy: RunningProxy) -> str:
    async with http.get(f"{proxy.ops_url}/metrics") as response:
        return await response.text()
