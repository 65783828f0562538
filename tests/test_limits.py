"""Admission: the concurrency cap and the rate limit answer 429 with Retry-After, and recover."""

from __future__ import annotations

import json

import aiohttp

from .conftest import ProxyFactory, exec_events, final, survivors, wait_for_processes


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
    assert await survivors(marker) == []
    async with http.get(f"{proxy.ops_url}/metrics") as metrics:
        text = await metrics.text()
    assert "session_proxy_exec_in_flight 0.0" in text
    assert 'session_proxy_exec_requests_total{outcome="client_gone"} 20.0' in text
    events = await exec_events(http, proxy, {"command": ["true"]})
    assert final(events)["exit_code"] == 0


async def test_rate_limit_refuses_bursts_with_retry_after(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """Past the burst, with no wait allowed, requests get 429 rate_limited and Retry-After."""
    proxy = await make_proxy(rate_limit=0.5, rate_burst=3, rate_limit_wait=0)
    statuses = []
    for _ in range(5):
        async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
            statuses.append(response.status)
            if response.status == 429:
                assert response.headers["Retry-After"] == "2"
                assert (await response.json())["error"]["code"] == "rate_limited"
            else:
                await response.read()
    assert statuses == [200, 200, 200, 429, 429]
    async with http.get(f"{proxy.ops_url}/metrics") as metrics:
        assert 'session_proxy_rejections_total{reason="rate_limited"} 2.0' in await metrics.text()


async def test_rate_limit_short_wait_absorbs_a_small_burst(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory
) -> None:
    """With a wait allowance longer than one token's refill, an over-burst request waits, then runs."""
    proxy = await make_proxy(rate_limit=20, rate_burst=1, rate_limit_wait=5)
    for _ in range(3):
        events = await exec_events(http, proxy, {"command": ["true"]})
        assert final(events)["exit_code"] == 0
