"""Slow and stalled clients cannot starve real ones, and the server lets them go.

1,000 connections trickle their headers or their bodies a byte at a time while a real exec and
/healthz are served; the test reports when the server closed each kind. Clients that stop
reading their exec's answer are disconnected once it ended. Figures: docs/reliability.md,
"Reliability"; ``-s`` prints them.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import psutil
import pytest

from .conftest import ProxyProcess

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

TRICKLERS = 500  # of each kind: 1,000 in all
TRICKLE_INTERVAL = 1.0  # seconds between bytes
BODY_TIMEOUT = 5


@dataclass
class Trickler:
    """One slow client; ``closed_after`` is when the server hung up (None: it never did)."""

    kind: str
    started: float = field(default_factory=time.monotonic)
    closed_after: float | None = None
    answer: bytes = b""


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter, float]  # and when it was opened


async def connect_gradually(port: int, server: psutil.Process, count: int) -> list[Connection]:
    """Open ``count`` connections, a batch at a time, each batch accepted before the next.

    A thousand connects at once overflow the listen queue (128), and the kernel then resets
    some of them (SYN cookies that fail): that would test the kernel, not the proxy.
    """
    opened: list[Connection] = []
    while len(opened) < count:
        batch = min(50, count - len(opened))
        for _ in range(batch):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append((reader, writer, time.monotonic()))
        deadline = time.monotonic() + 30
        while _established(server, port) < len(opened):
            assert time.monotonic() < deadline, "the proxy stopped accepting connections"
            await asyncio.sleep(0.02)
    return opened


def _established(server: psutil.Process, port: int) -> int:
    connections = server.net_connections("tcp")
    return sum(1 for c in connections if c.laddr.port == port and c.status == "ESTABLISHED")


async def trickle(
    connection: Connection, trickler: Trickler, prefix: bytes, drip: bytes, give_up: asyncio.Event
) -> None:
    """Send ``prefix`` at once, then ``drip`` a byte a second, until the server closes."""
    reader, writer, trickler.started = connection
    try:
        writer.write(prefix)
        for byte in drip:
            if give_up.is_set() or not await _send_and_listen(reader, writer, trickler, bytes([byte])):
                break
        while not give_up.is_set() and trickler.closed_after is None:
            await _send_and_listen(reader, writer, trickler, b"")
    finally:
        writer.close()


async def _send_and_listen(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickler: Trickler, data: bytes
) -> bool:
    """Send ``data``, read for up to one interval; False once the server has closed."""
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(4096), TRICKLE_INTERVAL)
    except TimeoutError:
        return True
    except ConnectionError:
        received = b""
    trickler.answer += received
    if received:
        return True
    trickler.closed_after = time.monotonic() - trickler.started
    return False


def _headers(port: int) -> tuple[bytes, bytes]:
    lines = f"Host: 127.0.0.1:{port}\r\n" + "".join(f"X-Slow-{i}: {'v' * 20}\r\n" for i in range(40)) + "\r\n"
    return b"GET /healthz HTTP/1.1\r\n", lines.encode()


def _body(port: int) -> tuple[bytes, bytes]:
    body = json.dumps({"command": ["echo", "x" * 900]}).encode()
    head = (
        f"POST /exec HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


async def _served(http: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """A real exec and /healthz, answered in full; their latencies in seconds."""
    started = time.monotonic()
    async with http.post(f"{url}/exec", json={"command": ["echo", "served"]}) as response:
        assert response.status == 200
        events = [json.loads(line) for line in (await response.text()).splitlines()]
    exec_seconds = time.monotonic() - started
    assert events[-1]["type"] == "exit"
    assert events[-1]["exit_code"] == 0
    started = time.monotonic()
    async with http.get(f"{url}/healthz") as response:
        assert response.status == 200
    return exec_seconds, time.monotonic() - started


async def test_trickling_clients_do_not_starve_real_ones(spawn_proxy: Callable[..., ProxyProcess]) -> None:
    """1,000 trickling connections: execs and /healthz keep being served; the server closes them."""
    proxy = spawn_proxy("--rate-limit", "0", "--body-timeout", str(BODY_TIMEOUT))
    port = int(proxy.url.rsplit(":", 1)[1])
    give_up = asyncio.Event()
    tricklers = [Trickler("headers") for _ in range(TRICKLERS)] + [Trickler("body") for _ in range(TRICKLERS)]
    shapes = {"headers": _headers(port), "body": _body(port)}
    connections = await connect_gradually(port, psutil.Process(proxy.process.pid), len(tricklers))
    tasks = [
        asyncio.create_task(trickle(connection, t, *shapes[t.kind], give_up))
        for connection, t in zip(connections, tricklers, strict=True)
    ]
    latencies = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(task.done() for task in tasks):
            latencies.append(await _served(http, proxy.url))
            await asyncio.sleep(0.5)
        give_up.set()
        await asyncio.gather(*tasks)
        latencies.append(await _served(http, proxy.url))
    assert len(latencies) >= 5
    report: dict[str, object] = {"served": len(latencies),
              "exec_p50_ms": round(statistics.median(e for e, _ in latencies) * 1000, 1),
              "exec_max_ms": round(max(e for e, _ in latencies) * 1000, 1),
              "healthz_max_ms": round(max(h for _, h in latencies) * 1000, 1)}  # fmt: skip
    for kind in ("headers", "body"):
        closed = [t.closed_after for t in tricklers if t.kind == kind and t.closed_after is not None]
        report[f"{kind}_closed"] = len(closed)
        if closed:
            report[f"{kind}_closed_s_min_max"] = (round(min(closed), 1), round(max(closed), 1))
    print("\nslow clients:", report)
    body_tricklers = [t for t in tricklers if t.kind == "body"]
    # A body that trickles past --body-timeout is refused with 408 and its connection closed.
    assert all(t.closed_after is not None for t in body_tricklers), report
    odd = [
        (t.closed_after, t.answer[:80]) for t in body_tricklers if not t.answer.startswith(b"HTTP/1.1 408")
    ]
    assert not odd, (report, odd[:5])


async def test_clients_that_stop_reading_are_disconnected(spawn_proxy: Callable[..., ProxyProcess]) -> None:
    """Clients that never read their answer: after the exec ended, the server drops them."""
    proxy = spawn_proxy("--rate-limit", "0", "--max-concurrent", "50")
    port = int(proxy.url.rsplit(":", 1)[1])
    server = psutil.Process(proxy.process.pid)
    rss_before = server.memory_info().rss
    body = json.dumps({"command": ["head", "-c", "50000000", "/dev/zero"], "timeout": 1}).encode()
    request = (
        f"POST /exec HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    writers = []
    for _ in range(20):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        writers.append(writer)
    started = time.monotonic()
    while _established(server, port) < len(writers):  # accepted: each exec is under way
        assert time.monotonic() - started < 30, "the proxy did not accept the non-reading clients"
        await asyncio.sleep(0.05)
    peak = 0
    rss_peak = 0
    try:
        while (count := _established(server, port)) > 0:
            peak = max(peak, count)
            rss_peak = max(rss_peak, server.memory_info().rss)
            assert time.monotonic() - started < 120, f"{count} non-reading clients still connected"
            await asyncio.sleep(0.5)
    finally:
        for writer in writers:
            writer.close()
    print(f"\nnon-reading clients: {peak} connected, all closed after {time.monotonic() - started:.1f} s; "
          f"RSS {rss_before / 2**20:.0f} MB before, {rss_peak / 2**20:.0f} MB peak, "
          f"{server.memory_info().rss / 2**20:.0f} MB after")  # fmt: skip
    assert peak == 20
