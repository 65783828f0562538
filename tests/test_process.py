"""The proxy as its own process: SIGTERM drains and exits 0; a slow reader keeps memory bounded."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable

import aiohttp
import psutil

from .conftest import ProxyProcess, final, output_of, survivors, wait_for_processes

MiB = 1024 * 1024


async def read_events(response: aiohttp.ClientResponse) -> list[dict[str, object]]:
    return [json.loads(line) async for line in response.content]


async def test_sigterm_ends_execs_with_shutdown_and_exits_0(
    spawn_proxy: Callable[..., ProxyProcess], http: aiohttp.ClientSession, marker: str
) -> None:
    """On SIGTERM, execs still running after the grace get reason shutdown; the proxy exits 0."""
    proxy = spawn_proxy("--shutdown-grace", "0.5", "--kill-grace", "1")
    body = {"command": ["sh", "-c", f"echo up; sleep {marker} & sleep {marker}"], "timeout": 60}
    responses = [await http.post(f"{proxy.url}/exec", json=body) for _ in range(2)]
    await wait_for_processes(marker, 4)
    proxy.process.send_signal(signal.SIGTERM)
    for response in responses:
        events = await read_events(response)
        assert output_of(events, "stdout") == b"up\n"  # type: ignore[arg-type]
        assert final(events)["reason"] == "shutdown"  # type: ignore[arg-type]
    assert await asyncio.to_thread(proxy.process.wait, 30) == 0
    assert await survivors(marker, within=0) == []
    messages = [line["msg"] for line in proxy.log_lines()]
    assert messages.count("exec finished") == 2
    assert messages[-1] == "stopped"


async def test_sigterm_lets_running_execs_finish_within_grace(
    spawn_proxy: Callable[..., ProxyProcess], http: aiohttp.ClientSession
) -> None:
    """An exec that ends within the grace completes normally; new requests are not accepted."""
    proxy = spawn_proxy("--shutdown-grace", "30")
    body = {"command": ["sh", "-c", "echo begin; sleep 1; echo end"]}
    response = await http.post(f"{proxy.url}/exec", json=body)
    assert json.loads(await response.content.readline())["type"] == "start"
    proxy.process.send_signal(signal.SIGTERM)
    events = await read_events(response)
    assert final(events)["reason"] == "exited"  # type: ignore[arg-type]
    assert output_of(events, "stdout") == b"begin\nend\n"  # type: ignore[arg-type]
    assert await asyncio.to_thread(proxy.process.wait, 30) == 0


async def test_second_signal_skips_the_grace(
    spawn_proxy: Callable[..., ProxyProcess], http: aiohttp.ClientSession, marker: str
) -> None:
    """A second SIGTERM ends running execs at once instead of waiting out a long grace."""
    proxy = spawn_proxy("--shutdown-grace", "600")
    response = await http.post(f"{proxy.url}/exec", json={"command": ["sleep", marker]})
    await wait_for_processes(marker, 1)
    proxy.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert proxy.process.poll() is None  # still draining
    proxy.process.send_signal(signal.SIGINT)
    assert final(await read_events(response))["reason"] == "shutdown"  # type: ignore[arg-type]
    assert await asyncio.to_thread(proxy.process.wait, 30) == 0


async def test_slow_reader_keeps_proxy_memory_bounded(
    spawn_proxy: Callable[..., ProxyProcess], http: aiohttp.ClientSession, marker: str
) -> None:
    """A command writing 400 MB to a reader that pauses does not grow the proxy's memory.

    While the client reads nothing, the producer must be blocked (its output count stops) and
    the proxy's RSS must stay within a few MB; then everything still arrives in full.
    """
    proxy = spawn_proxy("--max-output-bytes", str(1024 * MiB), "--default-timeout", "300")
    rss = psutil.Process(proxy.process.pid).memory_info
    size = 400 * MiB
    script = f"sleep {marker} & head -c {size} /dev/zero | tr '\\0' 'a'"
    baseline = rss().rss
    response = await http.post(f"{proxy.url}/exec", json={"command": ["sh", "-c", script]})
    await response.content.readline()  # start event
    await asyncio.sleep(1.5)  # the reader pauses: the pipes and socket buffers fill up
    paused_rss = rss().rss
    tr = [p for p in psutil.Process(proxy.process.pid).children(recursive=True) if p.name() == "tr"]
    assert tr, "producer should still be running while the client is not reading"
    # /proc/<pid>/io (the local backend is Linux-only): if it is missing the test fails, it
    # does not compare 0 with 0.
    written = tr[0].io_counters().write_chars
    assert written > 0, "the producer should have written something before it was held back"
    await asyncio.sleep(1.0)
    written_later = tr[0].io_counters().write_chars
    assert written_later == written, "producer kept writing while nobody read"
    assert written < 64 * MiB
    received = 0
    peak = paused_rss
    async for data in response.content.iter_chunked(256 * 1024):
        received += len(data)
        if received % (32 * MiB) < 256 * 1024:
            peak = max(peak, rss().rss)
            await asyncio.sleep(0.01)  # keep reading slowly
    assert received > size  # JSON framing adds a little to the 400 MB payload
    assert paused_rss - baseline < 20 * MiB, (baseline, paused_rss)
    assert peak - baseline < 40 * MiB, (baseline, peak)
    assert await survivors(marker) == []
