"""Hostile request lines, targets and bodies get a clear 4xx/505 JSON answer, and nothing runs."""

from __future__ import annotations

import json

import aiohttp
import pytest

from .conftest import ProxyFactory, RunningProxy, exec_events, final, processes_with
from .http_raw import request_bytes, send_raw

pytestmark = pytest.mark.timeout(60)


async def test_http10_exec_is_refused_before_the_command_starts(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession, marker: str
) -> None:
    """`curl -0` three times with a cap of 1: three 505s, no command started, the cap intact.

    Chunked streaming needs HTTP/1.1; before the refusal the command started and then the
    answer failed with a 500, leaving the command running outside every bound.
    """
    proxy = await make_proxy(max_concurrent=1)
    body = json.dumps({"command": ["sleep", marker], "timeout": 2}).encode()
    for _ in range(3):
        answer = await send_raw(proxy.port, request_bytes(proxy.port, body=body, version="HTTP/1.0"))
        assert answer.status == 505
        error = answer.error()
        assert error["code"] == "http_version"
        assert "HTTP/1.1" in error["message"]
    assert processes_with(marker) == []
    async with http.get(f"{proxy.url}/status") as response:
        assert (await response.json())["in_flight"] == 0
    assert final(await exec_events(http, proxy, {"command": ["true"]}))["exit_code"] == 0


@pytest.mark.parametrize("target", ["/exec", "/healthz"])
async def test_a_request_line_saying_http2_is_505(proxy: RunningProxy, target: str) -> None:
    """HTTP/2.0 in an HTTP/1 request line is no version this server speaks: 505 on every path."""
    method = "POST" if target == "/exec" else "GET"
    answer = await send_raw(proxy.port, request_bytes(proxy.port, method, target, version="HTTP/2.0"))
    assert answer.status == 505
    assert answer.error()["code"] == "http_version"


async def test_http10_is_still_served_where_nothing_streams(proxy: RunningProxy) -> None:
    """The refusal is about streaming: a plain HTTP/1.0 GET still gets its answer."""
    answer = await send_raw(proxy.port, request_bytes(proxy.port, "GET", "/healthz", b"", version="HTTP/1.0"))
    assert answer.status == 200
    assert json.loads(answer.body) == {"status": "ok"}


@pytest.mark.parametrize(
    "target",
    ["http://evil.example/exec", "http://evil.example:{port}/exec", "http://127.0.0.1:1/exec",
     "https://127.0.0.1:{port}/exec", "HTTP://EVIL.EXAMPLE/exec"],
)  # fmt: skip
async def test_a_target_naming_another_listener_is_refused(
    proxy: RunningProxy, target: str, marker: str
) -> None:
    """An absolute-form target must name this listener as the Host header must: else 403."""
    body = json.dumps({"command": ["sleep", marker]}).encode()
    head = request_bytes(proxy.port, target=target.format(port=proxy.port), body=body)
    answer = await send_raw(proxy.port, head)
    assert answer.status == 403, answer
    assert answer.error()["code"] == "bad_target"
    assert processes_with(marker) == []


async def test_a_target_naming_this_listener_is_served(proxy: RunningProxy) -> None:
    """Absolute-form is legal HTTP (RFC 9112 3.2.2): naming this listener, it runs."""
    target = f"http://localhost:{proxy.port}/exec"
    answer = await send_raw(proxy.port, request_bytes(proxy.port, target=target))
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/x-ndjson"


async def call(proxy: RunningProxy, body: bytes) -> tuple[int, dict[str, object]]:
    answer = await send_raw(proxy.port, request_bytes(proxy.port, body=body))
    return answer.status, answer.error() if answer.status != 200 else {}


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"command": ["true"], "timeout": 99999, "timeout": 1}', "timeout"),
        (b'{"command": ["sleep", "300"], "command": ["true"]}', "command"),
        (b'{"command": ["true"], "env": {"A": "1", "A": "2"}}', "A"),
    ],
)
async def test_duplicate_keys_are_refused_naming_the_key(proxy: RunningProxy, body: bytes, key: str) -> None:
    """Two readers may keep different duplicates, so a body with one is refused: 400 naming it."""
    status, error = await call(proxy, body)
    assert status == 400
    assert error["code"] == "malformed_request"
    assert f"duplicate key {key!r}" in str(error["message"])


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
     b'{"command": ["true"], "env": ' + b'{"x":' * 3000 + b"1" + b"}" * 3001],
)  # fmt: skip
async def test_deeply_nested_json_is_400_not_500(proxy: RunningProxy, body: bytes) -> None:
    """JSON nested thousands deep (a RecursionError inside the parser) is a clean 400."""
    status, error = await call(proxy, body)
    assert status == 400
    assert "nested too deeply" in str(error["message"])


@pytest.mark.parametrize(
    "body",
    [b'{"command": ["true"], "timeout": NaN}', b'{"command": ["true"], "timeout": Infinity}',
     b'{"command": ["true"], "timeout": -Infinity}',
     b'{"command": ["true"], "timeout": 1' + b"0" * 5000 + b"}",
     b'{"command": ["true"]} trailing', b"\xff\xfe"],
)  # fmt: skip
async def test_non_json_numbers_and_bytes_are_400(proxy: RunningProxy, body: bytes) -> None:
    """NaN, Infinity, integers past Python's digit limit and stray bytes are not JSON: 400."""
    status, error = await call(proxy, body)
    assert status == 400, error
    assert error["code"] == "malformed_request"


async def test_a_huge_finite_timeout_is_422_naming_it(proxy: RunningProxy) -> None:
    """1e400 parses (as infinity) and is then refused as a timeout over the maximum."""
    status, error = await call(proxy, b'{"command": ["true"], "timeout": 1e400}')
    assert status == 422
    assert [f["field"] for f in error["fields"]] == ["timeout"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("tail", ["%C2%B2", "1" * 4400, "-1", "1e3", "10001", "+5", "%205", "%D9%A3", ""])
async def test_bad_log_tail_is_422(http: aiohttp.ClientSession, proxy: RunningProxy, tail: str) -> None:
    """`tail` is ASCII digits within 0..10000; '²', Arabic digits or 4,400 digits are 422, not 500."""
    async with http.get(f"{proxy.url}/logs?tail={tail}") as response:
        assert response.status == 422
        assert [f["field"] for f in (await response.json())["error"]["fields"]] == ["tail"]


@pytest.mark.parametrize("tail", ["0", "100", "10000", "000007"])
async def test_good_log_tail_reaches_the_backend(
    http: aiohttp.ClientSession, proxy: RunningProxy, tail: str
) -> None:
    """A valid `tail` passes validation (the local backend then answers 404: it has no log)."""
    async with http.get(f"{proxy.url}/logs?tail={tail}") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"


async def test_405_names_the_allowed_methods(http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
    """A 405 says in `Allow` and in its message which methods the path takes (RFC 9110 15.5.6)."""
    async with http.get(f"{proxy.url}/exec") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert "use POST" in (await response.json())["error"]["message"]
    async with http.post(f"{proxy.ops_url}/metrics") as response:
        assert response.status == 405
        assert set(response.headers["Allow"].split(",")) >= {"GET"}
