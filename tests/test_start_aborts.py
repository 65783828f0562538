"""Requests aborted at random instants around their command's start leave nothing behind.

Hundreds of requests per case, each hung up (a raw socket closed with FIN or RST) or
cancelled (MCP ``notifications/cancelled``) at a random instant from just after sending to
about twice the usual time to the ``start`` event, several at once, against a proxy running
as its own process, on both backends and on the warm and cold Kubernetes paths. Afterwards:
- no command survives (each one sleeps until it is ended);
- every command that ran has exactly one ``exec finished`` line (found by its argv digest),
  the lines agree with ``session_proxy_exec_requests_total``, and in-flight is 0;
- every concurrency slot is free (``--max-concurrent`` requests run at once again);
- the proxy holds exactly the file descriptors it held before (sockets to the API server
  aside, whose idle keep-alive pool varies; the API server then holds only the warm execs);
- the proxy's log holds no error and no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from session_proxy.logs import argv_digest

from .conftest import TOKEN, ProxyProcess, survivors
from .http_raw import request_bytes

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]
LABELS = {"session": "s1", "type": "workspace"}
# Slots, so that a good part of the tries reach a start (an ended command holds its slot until
# its group is gone, so a storm runs into the cap; tries refused with 429 start nothing).
MAX_CONCURRENT = {"local": 40, "kubernetes": 16}
AT_ONCE = 6  # aborted requests in flight at a time
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Target:
    """The proxy under test and how to count what it holds."""

    proxy: ProxyProcess
    marker: str
    started: Path  # each command appends its try number here when it runs
    slots: int = MAX_CONCURRENT["local"]  # its --max-concurrent
    api_port: int | None = None  # the Kubernetes API test server's port, if any
    kube: Any = None

    @property
    def port(self) -> int:
        return int(self.proxy.url.rsplit(":", 1)[1])

    def argv(self, n: int) -> list[str]:
        return ["sh", "-c", f"echo {n} >> {self.started}; exec sleep {self.marker}"]

    def holdings(self) -> tuple[int, int]:
        """The proxy's fds other than TCP connections, and its TCP connections to anyone but
        itself and the API server (whose keep-alive pools vary): clients' connections."""
        process = psutil.Process(self.proxy.process.pid)
        connected = [c for c in process.net_connections("tcp") if c.status != psutil.CONN_LISTEN]
        own_ports = {c.laddr.port for c in connected}
        clients = [c for c in connected if c.raddr and c.raddr.port not in (*own_ports, self.api_port)]
        return process.num_fds() - len(connected), len(clients)


async def scrape(http: aiohttp.ClientSession, target: Target) -> dict[str, float]:
    async with http.get(f"{target.proxy.ops_url}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("session_proxy_exec_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def time_to_start(target: Target) -> float:
    """Seconds from sending a request to its ``start`` event, the median of a few."""
    samples = []
    for _ in range(5):
        began = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        body = json.dumps({"command": ["true"]}).encode()
        writer.write(request_bytes(target.port, body=body))
        while b'"type":"start"' not in await reader.readline():
            pass
        samples.append(time.monotonic() - began)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        with contextlib.suppress(ConnectionError):
            await reader.read()
    return sorted(samples)[len(samples) // 2]


async def hang_up(target: Target, n: int, delay: float, reset: bool) -> None:
    """Send the request whole, wait ``delay``, then close: with RST (``reset``) or FIN."""
    _, writer = await asyncio.open_connection("127.0.0.1", target.port)
    writer.write(request_bytes(target.port, body=json.dumps({"command": target.argv(n)}).encode()))
    await writer.drain()
    await asyncio.sleep(delay)
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class McpSession:
    """One MCP session on the proxy's /mcp, spoken by hand."""

    def __init__(self, http: aiohttp.ClientSession, target: Target) -> None:
        self._http = http
        self._url = f"{target.proxy.url}/mcp"
        self._headers = dict(MCP_HEADERS)

    async def open(self) -> None:
        initialize = {
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "aborts", "version": "0"}},
        }  # fmt: skip
        async with self._http.post(self._url, json=initialize, headers=self._headers) as response:
            assert response.status == 200, await response.text()
            self._headers["Mcp-Session-Id"] = response.headers["Mcp-Session-Id"]
            await response.read()
        self._headers["Mcp-Protocol-Version"] = "2025-11-25"
        await self.notify("notifications/initialized", {})

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        async with self._http.post(self._url, json=message, headers=self._headers) as response:
            assert response.status == 202, await response.text()

    async def cancel_call(self, n: int, command: str, delay: float) -> None:
        """Call ``exec`` with ``command``, and cancel the call ``delay`` seconds after sending it."""
        call = {
            "jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "exec", "arguments": {"command": command}},
        }  # fmt: skip
        async with aiohttp.ClientSession() as own:  # its own connection, closed at the end
            calling = asyncio.create_task(own.post(self._url, json=call, headers=self._headers))
            await asyncio.sleep(delay)
            await self.notify("notifications/cancelled", {"requestId": n, "reason": "aborted by the test"})
            calling.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                response = await calling
                response.close()


async def storm(tries: int, attempt: Callable[[int], Awaitable[None]]) -> None:
    """Run ``attempt(n)`` for n in range(tries), AT_ONCE at a time."""
    numbers = iter(range(tries))

    async def worker() -> None:
        for n in numbers:
            await attempt(n)

    await asyncio.gather(*(worker() for _ in range(AT_ONCE)))


async def all_slots_free(target: Target, tmp_path: Path) -> None:
    """``--max-concurrent`` commands run at once (a slot is held until its command's group is
    gone, so ends still under way are waited for): no slot was kept by an aborted request."""
    gate = tmp_path / "slots-gate"
    body = {"command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"]}
    running: list[aiohttp.ClientResponse] = []
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:  # its own: no connection of it stays open after
        try:
            while len(running) < target.slots:
                response = await http.post(f"{target.proxy.url}/exec", json=body)
                if response.status == 429:
                    response.release()
                    assert time.monotonic() < deadline, f"only {len(running)} slots came back"
                    await asyncio.sleep(0.1)
                    continue
                running.append(response)
                assert response.status == 200, await response.text()
                assert json.loads(await response.content.readline())["type"] == "start"
        finally:
            gate.touch()
            for response in running:
                events = [json.loads(line) async for line in response.content]
                response.release()
                assert events[-1]["reason"] == "exited", events


async def settle_and_check(
    http: aiohttp.ClientSession, target: Target, fds_before: int, tries: list[list[str]], tmp_path: Path
) -> dict[str, Any]:
    """The checks of the module docstring; returns figures for the test's report."""
    # First every slot: a slot comes back only once its command's end is over, and a start
    # still under way when its request ended holds its slot until it has been resolved too.
    await all_slots_free(target, tmp_path)
    assert await survivors(target.marker, within=30) == []
    deadline = time.monotonic() + 30
    while (metrics := await scrape(http, target))["session_proxy_exec_in_flight"] != 0:
        assert time.monotonic() < deadline, metrics
        await asyncio.sleep(0.05)
    ran = {int(n) for n in target.started.read_text().split()} if target.started.exists() else set()
    lines = [r for r in target.proxy.log_lines() if r.get("msg") == "exec finished"]
    digests = [r["argv_sha256"] for r in lines]
    for argv in tries:
        assert digests.count(argv_digest(argv)) <= 1, f"logged twice: {argv}"
    missing = [n for n in ran if argv_digest(tries[n]) not in set(digests)]
    assert missing == [], f"commands that ran without a log line: {missing}"
    counted = sum(v for k, v in metrics.items() if k.startswith("session_proxy_exec_requests_total{"))
    assert counted == len(lines), (counted, len(lines))
    deadline = time.monotonic() + 30
    while (held := target.holdings()) != (fds_before, 0):
        assert time.monotonic() < deadline, f"fds other than TCP {fds_before} -> {held[0]}; clients {held[1]}"
        await asyncio.sleep(0.1)
    problems = [r for r in target.proxy.log_lines() if r.get("level") in ("error", "critical")]
    text = target.proxy.log_path.read_text()
    assert problems == [], problems
    assert "Traceback" not in text
    assert "Task was destroyed" not in text
    return {"tries": len(tries), "ran": len(ran), "logged": len(lines)}


async def abort_storm(
    http: aiohttp.ClientSession, target: Target, tmp_path: Path, *, raw: int, mcp: int
) -> dict[str, Any]:
    """``raw`` hang-ups and ``mcp`` cancels at random instants, then every check."""
    seed = random.randrange(2**32)
    chance = random.Random(seed)
    fds_before, _ = target.holdings()
    window = 2 * await time_to_start(target)
    tries: list[list[str]] = []

    async def raw_try(n: int) -> None:
        await hang_up(target, n, chance.uniform(0, window), reset=chance.random() < 0.5)

    tries += [target.argv(n) for n in range(raw)]
    await storm(raw, raw_try)
    if mcp:
        session = McpSession(http, target)
        await session.open()
        tries += [target.argv(raw + n) for n in range(mcp)]

        async def mcp_try(n: int) -> None:
            # A tool call takes a hop more than /exec: the window is widened to match.
            command = target.argv(raw + n)[2]
            await session.cancel_call(raw + n, command, chance.uniform(0, 2 * window))

        await storm(mcp, mcp_try)
    figures = await settle_and_check(http, target, fds_before, tries, tmp_path)
    return {**figures, "seed": seed, "window_ms": round(window * 1000, 1)}


async def test_local_aborts_around_the_start(
    spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path, marker: str
) -> None:
    """Local backend: raw hang-ups and MCP cancels around the start leave nothing behind."""
    slots = MAX_CONCURRENT["local"]
    proxy = spawn_proxy("--max-concurrent", str(slots), "--rate-limit", "0", "--kill-grace", "0.2")
    target = Target(proxy, marker, tmp_path / "started", slots)
    async with aiohttp.ClientSession() as http:
        figures = await abort_storm(http, target, tmp_path, raw=900, mcp=300)
    print("local", figures)


@pytest.mark.parametrize("api_mode", ["modern"])
@pytest.mark.parametrize("exec_path", ["cold", "warm"])
async def test_kubernetes_aborts_around_the_start(
    spawn_proxy: Callable[..., ProxyProcess], kube: Any, tmp_path: Path, marker: str, exec_path: str
) -> None:
    """Kubernetes backend, cold and warm: raw hang-ups and MCP cancels around the start leave
    nothing behind, in the proxy or in the pod; the API server holds only the warm execs."""
    kube.add_pod("ws-1", labels=LABELS)
    config = kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN)
    warm = 2 if exec_path == "warm" else 0
    proxy = spawn_proxy(
        "--backend", "kubernetes", "--kubeconfig", str(config), "--namespace", "default",
        "--session-name", "s1", "--workspace-wait", "3", "--kill-grace", "0.2", "--rate-limit", "0",
        "--max-concurrent", str(MAX_CONCURRENT["kubernetes"]), "--warm-execs", str(warm),
    )  # fmt: skip
    api_port = int(kube.url.rsplit(":", 1)[1])
    target = Target(proxy, marker, tmp_path / "started", MAX_CONCURRENT["kubernetes"], api_port, kube)
    async with aiohttp.ClientSession() as http:

        async def pool_full() -> None:
            deadline = time.monotonic() + 30
            while True:
                async with http.get(f"{proxy.url}/status") as response:
                    pool = (await response.json())["target"].get("warm_pool") or {}
                if pool.get("ready", 0) >= warm:
                    return
                assert time.monotonic() < deadline, pool
                await asyncio.sleep(0.05)

        async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
            await response.read()  # probes the image, opens the pool
        await pool_full()
        figures = await abort_storm(http, target, tmp_path, raw=400, mcp=120)
        await pool_full()
        assert len(kube.sessions) == warm, [s.command for s in kube.sessions]
    print(exec_path, figures)
