"""The exec API refuses DNS-rebound, browser-originated and malformed requests, each clearly."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from .conftest import ProxyFactory, RunningProxy

GOOD_BODY = b'{"command": ["true"]}'


async def raw_request(port: int, head: str, body: bytes = GOOD_BODY) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as written (no client fixes up headers) and parse the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    await writer.wait_closed()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload


def post(host_lines: str, body: bytes = GOOD_BODY, extra: str = "") -> str:
    return (
        f"POST /exec HTTP/1.1\n{host_lines}Content-Type: application/json\n"
        f"Content-Length: {len(body)}\n{extra}Connection: close\n"
    )


@pytest.mark.parametrize(
    "host",
    ["evil.example:{port}", ":{port}", "localhost.:{port}", "127.0.0.1:1", "127.0.0.1",
     "user@127.0.0.1:{port}", "169.254.169.254:{port}"],
)  # fmt: skip
async def test_foreign_host_header_is_refused(proxy: RunningProxy, host: str) -> None:
    """A Host that is not loopback with this port is refused (DNS rebinding) with a JSON reason."""
    status, headers, payload = await raw_request(proxy.port, post(f"Host: {host.format(port=proxy.port)}\n"))
    assert status == 403
    assert json.loads(payload)["error"]["code"] == "bad_host"
    assert not any(name.startswith("access-control-") for name in headers)


async def test_missing_host_header_is_refused(proxy: RunningProxy) -> None:
    """No Host is refused, although aiohttp's request.host would fall back to the socket address.

    HTTP/1.1 without Host already fails aiohttp's parser (400); HTTP/1.0 reaches the guard.
    """
    status, _, _ = await raw_request(proxy.port, post(""))
    assert status == 400
    status, _, payload = await raw_request(proxy.port, post("").replace("HTTP/1.1", "HTTP/1.0"))
    assert status == 403
    assert json.loads(payload)["error"]["code"] == "bad_host"


async def test_duplicate_host_header_is_refused(proxy: RunningProxy) -> None:
    """Two Host headers are refused (by aiohttp's parser or by the guard)."""
    host = f"Host: 127.0.0.1:{proxy.port}\n"
    status, _, _ = await raw_request(proxy.port, post(host + host))
    assert status in (400, 403)


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "127.0.0.1", "[::1]"])
async def test_loopback_host_names_are_accepted(proxy: RunningProxy, name: str) -> None:
    """Each loopback spelling with the right port passes (case-insensitively)."""
    status, headers, payload = await raw_request(proxy.port, post(f"Host: {name}:{proxy.port}\n"))
    assert status == 200, payload
    assert headers["content-type"] == "application/x-ndjson"


BROWSER_FETCH = "Sec-Fetch-Site: same-site\nSec-Fetch-Mode: no-cors\nSec-Fetch-Dest: empty"


@pytest.mark.parametrize(
    "header",
    ["Origin: http://127.0.0.1:{port}", "Origin: null", "Sec-Fetch-Site: cross-site", BROWSER_FETCH],
)  # fmt: skip
async def test_browser_requests_are_refused(proxy: RunningProxy, header: str) -> None:
    """Any Origin (even our own) or Sec-Fetch-Site means a browser: 403, no CORS headers."""
    extra = header.format(port=proxy.port) + "\n"
    status, headers, payload = await raw_request(
        proxy.port, post(f"Host: 127.0.0.1:{proxy.port}\n", extra=extra)
    )
    assert status == 403
    assert json.loads(payload)["error"]["code"] == "browser_request"
    assert not any(name.startswith("access-control-") for name in headers)


@pytest.mark.parametrize("header", ["Sec-Fetch-Mode: cors", "Sec-Fetch-Mode: cors\nSec-Fetch-Dest: empty"])
async def test_fetch_metadata_without_site_is_not_a_browser(proxy: RunningProxy, header: str) -> None:
    """Node's fetch (undici) sends Sec-Fetch-Mode but never Sec-Fetch-Site: it is let in."""
    head = post(f"Host: 127.0.0.1:{proxy.port}\n", extra=header + "\n")
    status, _, payload = await raw_request(proxy.port, head)
    assert status == 200, payload


async def test_preflight_is_refused_without_cors(proxy: RunningProxy) -> None:
    """An OPTIONS preflight gets no Access-Control-Allow-* header, so the browser gives up."""
    head = (
        f"OPTIONS /exec HTTP/1.1\nHost: 127.0.0.1:{proxy.port}\nOrigin: http://evil.example\n"
        "Access-Control-Request-Method: POST\nConnection: close\n"
    )
    status, headers, _ = await raw_request(proxy.port, head, b"")
    assert status in (403, 405)
    assert not any(name.startswith("access-control-") for name in headers)


async def call(http: aiohttp.ClientSession, proxy: RunningProxy, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{proxy.url}/exec", **kwargs) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
)
async def test_non_json_content_type_is_415(
    http: aiohttp.ClientSession, proxy: RunningProxy, content_type: str
) -> None:
    """The body types a page can send without preflight are refused, even with valid JSON."""
    status, body = await call(http, proxy, data=GOOD_BODY, headers={"Content-Type": content_type})
    assert status == 415
    assert body["error"]["code"] == "unsupported_media_type"


async def test_content_encoding_is_415(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """Compressed bodies are refused before reading (no decompression bombs)."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, body = await call(http, proxy, data=b"\x1f\x8b", headers=headers)
    assert status == 415
    assert body["error"]["code"] == "content_encoding"


async def test_oversized_body_is_413(http: aiohttp.ClientSession, make_proxy: ProxyFactory) -> None:
    """A body over max_body_bytes is refused with 413, whether its length is declared or not."""
    proxy = await make_proxy(max_body_bytes=4096)
    big = json.dumps({"command": ["echo", "x" * 5000]}).encode()
    status, body = await call(http, proxy, data=big, headers={"Content-Type": "application/json"})
    assert status == 413
    assert body["error"]["code"] == "body_too_large"

    async def chunks() -> Any:
        yield big  # no Content-Length: chunked upload

    status, body = await call(http, proxy, data=chunks(), headers={"Content-Type": "application/json"})
    assert status == 413


async def test_malformed_json_is_400(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A body that is not JSON is a 400 that says so."""
    status, body = await call(
        http, proxy, data=b'{"command": [', headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert body["error"]["code"] == "malformed_request"


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        ({"command": []}, "command"),
        ({"command": "ls -la"}, "command"),
        ({"command": [""]}, "command"),
        ({"command": ["echo", 1]}, "command.1"),
        ({"command": ["echo", "a\u0000b"]}, "command"),
        ({"command": ["x" * 300_000]}, "command"),
        ({"command": ["true"] * 5000}, "command"),
        ({"command": ["true"], "workdir": "relative/dir"}, "workdir"),
        ({"command": ["true"], "workdir": "/tmp/\u0000x"}, "workdir"),
        ({"command": ["true"], "env": {"1BAD": "x"}}, "env"),
        ({"command": ["true"], "env": {"A=B": "x"}}, "env"),
        ({"command": ["true"], "env": {"OK": "nul\u0000"}}, "env"),
        ({"command": ["true"], "timeout": 0}, "timeout"),
        ({"command": ["true"], "timeout": -5}, "timeout"),
        ({"command": ["true"], "timeout": 99999}, "timeout"),
        ({"command": ["true"], "timeout": "10"}, "timeout"),
        ({"command": ["true"], "stdin_b64": "***"}, "stdin_b64"),
        ({"command": ["true"], "stdin": "a", "stdin_b64": "YQ=="}, "(body)"),
        ({"command": ["true"], "pod": "other-pod"}, "pod"),
        ({"command": ["true"], "namespace": "kube-system"}, "namespace"),
        ({"command": ["true"], "container": "sidecar"}, "container"),
        ([["true"]], "(body)"),
    ],
)
async def test_invalid_fields_are_422_naming_the_field(
    http: aiohttp.ClientSession, proxy: RunningProxy, request_body: Any, field: str
) -> None:
    """Each invalid field is refused with 422, the field's name and a reason; nothing runs."""
    status, body = await call(http, proxy, json=request_body)
    assert status == 422, body
    error = body["error"]
    assert error["code"] == "invalid_request"
    assert any(f["field"] == field for f in error["fields"]), error
    assert all(f["reason"] for f in error["fields"])


async def test_get_exec_is_405(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """/exec only takes POST."""
    async with http.get(f"{proxy.url}/exec") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_unknown_path_is_404_json(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """Unknown paths get a JSON 404 pointing at the API description."""
    async with http.get(f"{proxy.url}/nope") as response:
        assert response.status == 404
        assert "openapi" in (await response.json())["error"]["message"]


async def test_ops_listener_cannot_run_commands(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """The pod-IP listener has no /exec and no /status, and only GETs its three endpoints."""
    async with http.post(f"{proxy.ops_url}/exec", json={"command": ["true"]}) as response:
        assert response.status == 404
    async with http.get(f"{proxy.ops_url}/status") as response:
        assert response.status == 404
    async with http.post(f"{proxy.ops_url}/metrics") as response:
        assert response.status == 405
    for path in ("/metrics", "/healthz", "/readyz"):
        async with http.get(f"{proxy.ops_url}{path}") as response:
            assert response.status == 200, path


async def test_listener_binds_loopback_only(proxy: RunningProxy) -> None:
    """The exec API's bound sockets are all on 127.0.0.1."""
    runner = proxy.server._exec_runner
    assert runner is not None
    assert runner.addresses
    assert all(address[0] == "127.0.0.1" for address in runner.addresses)


async def test_unix_socket_listener_skips_host_but_not_origin(
    make_proxy: ProxyFactory, tmp_path: Any
) -> None:
    """On a unix socket there is no Host to check, but browser headers are still refused."""
    path = tmp_path / "exec.sock"
    await make_proxy(listen=f"unix:{path}")
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post("http://anything/exec", json={"command": ["echo", "via-unix"]}) as response:
            assert response.status == 200
            assert "via-unix" in await response.text()
        async with session.get("http://x/status", headers={"Origin": "http://x"}) as response:
            assert response.status == 403


async def test_oversized_header_line_is_refused(proxy: RunningProxy) -> None:
    """A header line over 8 KiB is refused by the parser before any handler runs."""
    extra = "X-Padding: " + "a" * 9000 + "\n"
    status, _, _ = await raw_request(proxy.port, post(f"Host: 127.0.0.1:{proxy.port}\n", extra=extra))
    assert status in (400, 431)


async def test_too_many_headers_are_refused(proxy: RunningProxy) -> None:
    """More than 64 headers are refused by the parser."""
    extra = "".join(f"X-H{i}: v\n" for i in range(100))
    status, _, _ = await raw_request(proxy.port, post(f"Host: 127.0.0.1:{proxy.port}\n", extra=extra))
    assert status in (400, 431)
    extra = "".join(f"X-H{i}: v\n" for i in range(20))
    status, _, _ = await raw_request(proxy.port, post(f"Host: 127.0.0.1:{proxy.port}\n", extra=extra))
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/healthz", None),
        ("GET", "/status", None),
        ("GET", "/openapi.json", None),
        ("POST", "/exec", {"command": ["true"]}),
        ("POST", "/exec", {"command": []}),
    ],
)
async def test_every_answer_forbids_caching_and_sniffing(
    make_proxy: ProxyFactory, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """Successes and errors alike carry no-store and nosniff: nothing the proxy says is cached."""
    proxy = await make_proxy()
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, proxy.url + path, json=body) as answer,
    ):
        await answer.read()
        assert answer.headers.get("Cache-Control") == "no-store"
        assert answer.headers.get("X-Content-Type-Options") == "nosniff"
