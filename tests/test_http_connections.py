"""Connections that misbehave are answered in JSON, logged briefly and let go within a bound."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import ProxyFactory, ProxyProcess, RunningProxy
from .http_raw import parse_answer, request_bytes, send_raw

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX: \x01\r\n\r\n", 400),
        (b"POST /exec HTTP/1.2\r\nHost: 127.0.0.1:{port}\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 400),
        (b"GET http:///exec HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"POST /exec HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 5\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", 400),
    ],
)  # fmt: skip
async def test_requests_the_parser_refuses_get_the_json_error_body(
    proxy: RunningProxy, data: bytes, status: int
) -> None:
    """aiohttp's own 400s are the API's JSON error body, without echoing the offending bytes."""
    answer = await send_raw(proxy.port, data.replace(b"{port}", str(proxy.port).encode()))
    assert answer.status == status
    error = answer.error()
    assert error["code"] == "malformed_http"
    assert "\\x01" not in error["message"]
    assert "aaaa" not in error["message"]
    assert answer.headers["cache-control"] == "no-store"


async def test_parse_errors_are_logged_briefly_and_rate_limited(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """200 malformed requests: a few one-line info records, no traceback, nothing at error level."""
    caplog.set_level(logging.DEBUG)
    for _ in range(200):
        answer = await send_raw(proxy.port, b"GARBAGE /x HTTP/1.1\r\n\r\n")
        assert answer.status == 400
    refused = [r for r in caplog.records if r.getMessage() == "request refused by the HTTP parser"]
    assert refused
    assert len(refused) <= 20, len(refused)  # a burst of 10, then one a second
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in refused)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_body_that_never_arrives_gets_408_and_the_connection_is_closed(
    make_proxy: ProxyFactory,
) -> None:
    """Headers promising 100 bytes and then silence: 408 JSON, then the server closes the socket."""
    proxy = await make_proxy(body_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    head = request_bytes(proxy.port, body=b'{"comm', content_length=100).replace(
        b"Connection: close\r\n", b""
    )
    writer.write(head)
    await writer.drain()
    # read() returns only at EOF: the server must close the connection itself.
    data = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    answer = parse_answer(data)
    assert answer.status == 408
    error = answer.error()
    assert error["code"] == "body_timeout"
    assert "--body-timeout" in error["message"]


async def test_a_stalled_body_does_not_hold_up_sigterm(spawn_proxy: Callable[..., ProxyProcess]) -> None:
    """SIGTERM with a connection stuck in its body: the proxy exits well before aiohttp's 60 s."""
    proxy = spawn_proxy("--body-timeout", "1", "--shutdown-grace", "0")
    port = int(proxy.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(port, body=b"{", content_length=100))
        await writer.drain()
        answer = await send_raw(port, request_bytes(port, "GET", "/healthz", b""))
        assert answer.status == 200
        proxy.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proxy.process.wait, 30) == 0
    finally:
        writer.close()


def _lower_fd_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def test_accept_failures_at_fd_exhaustion_are_rate_limited(tmp_path: Path) -> None:
    """Out of fds, asyncio logs every failed accept (thousands a second); the log stays bounded."""
    log_path = tmp_path / "proxy.log"
    command = [sys.executable, "-m", "session_proxy", "serve", "--listen", "127.0.0.1:0",
               "--ops-listen", "", "--backend", "local", "--local-root", str(tmp_path)]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stderr=log_file, preexec_fn=_lower_fd_limit(48))
    sockets = []
    try:
        port = int(_wait_for(log_path, rb'"exec_url": "http://127.0.0.1:(\d+)"').group(1))
        for _ in range(80):  # more than the proxy can accept: the rest wait in the backlog
            import socket

            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request_bytes(port, body=b"", content_length=100))
            sockets.append(sock)
        started = time.monotonic()
        _wait_for(log_path, rb'out of system resource.*"suppressed": \d+')
        elapsed = time.monotonic() - started
        lines = [json.loads(line) for line in log_path.read_bytes().splitlines() if b"out of system" in line]
        assert len(lines) <= 10 + 2 * (elapsed + 2), (len(lines), elapsed)
    finally:
        for sock in sockets:
            sock.close()
        process.send_signal(signal.SIGKILL)
        process.wait()


def _wait_for(path: Path, pattern: bytes, within: float = 30) -> re.Match[bytes]:
    deadline = time.monotonic() + within
    while not (match := re.search(pattern, path.read_bytes())):
        assert time.monotonic() < deadline, f"{pattern!r} never appeared in the log"
        time.sleep(0.05)
    return match
