"""drain_or_abort lets go of a client that does not read, and keeps one that does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from session_proxy.transport import abort_if_unsent, drain_or_abort

pytestmark = pytest.mark.timeout(60)

PAYLOAD = b"x" * (32 * 1024 * 1024)  # far more than loopback socket buffers hold


@dataclass
class Pair:
    """A loopback connection: the server side's transport and the client's raw socket."""

    transport: asyncio.WriteTransport
    client: socket.socket


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.WriteTransport] = loop.create_future()

    class Capture(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.WriteTransport)
            accepted.set_result(transport)

    server = await loop.create_server(Capture, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    transport = await asyncio.wait_for(accepted, 10)
    yield Pair(transport, client)
    transport.abort()
    client.close()
    server.close()
    await server.wait_closed()


async def test_a_client_that_does_not_read_is_aborted(pair: Pair) -> None:
    """Unsent bytes past the bound: the connection is aborted (the client sees it end)."""
    pair.transport.write(PAYLOAD)
    assert pair.transport.get_write_buffer_size() > 0
    assert await drain_or_abort(pair.transport, timeout=0.5) is False
    assert pair.transport.is_closing()
    assert pair.transport.get_write_buffer_size() == 0
    loop = asyncio.get_running_loop()
    received = 0
    while True:  # the client drains what the kernel holds, then the connection is gone
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(pair.client, 1 << 20), 10)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += len(chunk)
    assert received < len(PAYLOAD)


async def test_a_client_that_reads_is_kept(pair: Pair) -> None:
    """A client that takes the data: the buffer drains, True, the connection stays open."""
    loop = asyncio.get_running_loop()
    pair.transport.write(PAYLOAD)

    async def read_all() -> int:
        received = 0
        while received < len(PAYLOAD):
            received += len(await loop.sock_recv(pair.client, 1 << 20))
        return received

    reader = asyncio.create_task(read_all())
    assert await drain_or_abort(pair.transport, timeout=30) is True
    assert not pair.transport.is_closing()
    assert await asyncio.wait_for(reader, 30) == len(PAYLOAD)


async def test_a_gone_connection_is_left_alone() -> None:
    """No transport (the client already hung up): nothing to wait for."""
    assert await drain_or_abort(None, timeout=0.1) is True


async def test_a_finished_connection_still_holding_bytes_is_aborted(pair: Pair) -> None:
    """Closed gracefully with bytes the client will not take: aborted after the bound."""
    pair.transport.write(PAYLOAD)
    pair.transport.close()  # a graceful close waits for the buffer: for ever, here
    abort_if_unsent(pair.transport, timeout=0.2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while pair.transport.get_write_buffer_size() > 0:
        assert loop.time() < deadline, "the connection was never aborted"
        await asyncio.sleep(0.05)
