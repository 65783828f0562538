"""Hand-written hostile requests over raw sockets, against the unprivileged proxy.

Each gets the documented status and a JSON error body that matches the OpenAPI ``ErrorBody``;
nothing runs that should not; afterwards the proxy's log holds no error and no traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from session_proxy.openapi import openapi_document

from .fuzz_proxy import UnprivilegedProxy, unprivileged_proxy
from .http_raw import RawAnswer, request_bytes, send_raw

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

LIMIT = 65536  # --max-body-bytes of the proxy under test
COMPONENTS = openapi_document()["components"]
ERROR_BODY = Draft202012Validator({"$ref": "#/components/schemas/ErrorBody", "components": COMPONENTS})


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UnprivilegedProxy]:
    with unprivileged_proxy(tmp_path_factory.mktemp("hostile"), "--max-body-bytes", str(LIMIT)) as proxy:
        yield proxy
        assert proxy.problems_in_log() == []


def exec_body(document: Any) -> bytes:
    return json.dumps(document).encode()


def padded(size: int) -> bytes:
    """A valid request body of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    body = exec_body({"command": ["true"]})
    return body + b" " * (size - len(body))


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def head(port: int, lines: str, body: bytes = b"", method_line: str = "POST /exec HTTP/1.1") -> bytes:
    """A request with exactly these header lines (plus Host and Connection: close)."""
    text = f"{method_line}\r\nHost: 127.0.0.1:{port}\r\n{lines}Connection: close\r\n\r\n"
    return text.encode("latin-1") + body


JSON = "Content-Type: application/json\r\n"


def _cases(port: int) -> dict[str, tuple[bytes, int, str | None]]:
    """name -> (request bytes, expected status, expected error code or None for 200)."""

    def post(body: bytes, **kwargs: Any) -> bytes:
        return request_bytes(port, body=body, **kwargs)

    def get(target: str, lines: str = "") -> bytes:
        return head(port, lines, b"", f"GET {target} HTTP/1.1")

    def with_timeout(value: bytes) -> bytes:
        return post(b'{"command":["true"],"timeout":' + value + b"}")

    def with_env(value: bytes) -> bytes:
        return post(b'{"command":["true"],"env":' + value + b"}")

    good = padded(30)
    bad_request, bad_http, invalid = (
        (400, "malformed_request"),
        (400, "malformed_http"),
        (422, "invalid_request"),
    )
    too_large = (413, "body_too_large")
    chunked_json = JSON + "Transfer-Encoding: chunked\r\n"
    cases: dict[str, tuple[bytes, tuple[int, str | None]]] = {
        "deep arrays": (post(b"[" * 30_000 + b"]" * 30_000), bad_request),
        "deep objects in env": (with_env(b'{"a":' * 5_000 + b"1" + b"}" * 5_000), bad_request),
        "deep but parseable": (with_env(b'{"a":' * 500 + b"1" + b"}" * 500), invalid),
        "integer of 4000 digits": (with_timeout(b"9" * 4000), invalid),
        "integer of 5000 digits": (with_timeout(b"9" * 5000), bad_request),
        "float overflowing to infinity": (with_timeout(b"1e999"), invalid),
        "NaN": (with_timeout(b"NaN"), bad_request),
        "-Infinity": (with_timeout(b"-Infinity"), bad_request),
        "duplicate keys": (post(b'{"command":["true"],"timeout":99999,"timeout":1}'), bad_request),
        "chunked plus Content-Length": (
            head(port, chunked_json + "Content-Length: 5\r\n", chunked(good)),
            bad_http,
        ),
        "two Content-Lengths": (
            head(port, JSON + "Content-Length: 5\r\nContent-Length: 6\r\n", b"123456"),
            bad_http,
        ),
        "Transfer-Encoding gzip, chunked": (
            head(port, JSON + "Transfer-Encoding: gzip, chunked\r\n", chunked(good)),
            (415, "transfer_encoding"),
        ),
        "absolute-form, foreign host": (post(good, target="http://evil.example/exec"), (403, "bad_target")),
        "absolute-form, metadata IP": (post(good, target="http://169.254.169.254/exec"), (403, "bad_target")),
        "HTTP/1.0 without Host": (post(good, version="HTTP/1.0", host=None), (403, "bad_host")),
        "HTTP/1.0 POST /exec": (post(good, version="HTTP/1.0"), (505, "http_version")),
        "HTTP/2.0 request line": (post(good, version="HTTP/2.0"), (505, "http_version")),
        "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", bad_http),
        "body of exactly the limit": (post(padded(LIMIT)), (200, None)),
        "body of limit + 1, declared": (post(padded(LIMIT + 1)), too_large),
        "body of limit + 1, chunked": (head(port, chunked_json, chunked(padded(LIMIT + 1))), too_large),
        "Content-Length overflow": (head(port, JSON + "Content-Length: " + "9" * 30 + "\r\n"), bad_http),
        "negative Content-Length": (head(port, JSON + "Content-Length: -1\r\n"), bad_http),
        "lone surrogate in argv": (post(b'{"command":["echo","\\ud800"]}'), invalid),
        "raw-byte escape in argv": (post(b'{"command":["echo","\\udcff"]}'), (200, None)),
        "lone surrogate in an env name": (with_env(b'{"\\ud800":"x"}'), invalid),
        "invalid UTF-8": (post(b'{"command":["echo","\xff\xfe"]}'), bad_request),
        "UTF-8 byte order mark (RFC 8259 lets parsers ignore it)": (
            post(b"\xef\xbb\xbf" + exec_body({"command": ["true"]})),
            (200, None),
        ),
        "UTF-8-encoded surrogate": (post(b'{"command":["echo","\xed\xa0\x80"]}'), invalid),
        "empty body": (post(b""), bad_request),
        "NUL in a header value": (get("/healthz", "X-A: a\x00b\r\n"), bad_http),
        "space in a header name": (get("/healthz", "X A: b\r\n"), bad_http),
        "obsolete line folding": (get("/healthz", "X-A: a\r\n b\r\n"), bad_http),
        "target of 9 KiB": (get("/healthz?" + "a" * 9000), bad_http),
        "100 headers": (get("/healthz", "".join(f"X-{i}: v\r\n" for i in range(100))), bad_http),
        "lower-case method": (head(port, "Content-Length: 0\r\n", b"", "post /exec HTTP/1.1"), bad_http),
        "bare LF line ends": (f"GET /healthz HTTP/1.1\nHost: 127.0.0.1:{port}\n\n".encode(), bad_http),
        "LF in a chunk extension": (head(port, chunked_json, b"5;a\nb\r\n12345\r\n0\r\n\r\n"), bad_http),
        "Origin header": (post(good, extra="Origin: http://127.0.0.1\n"), (403, "browser_request")),
        "tail=²": (get("/logs?tail=%C2%B2"), invalid),
        "tail of 5000 digits": (get("/logs?tail=" + "9" * 5000), invalid),
        "DELETE /exec": (head(port, "", b"", "DELETE /exec HTTP/1.1"), (405, "method_not_allowed")),
    }
    return {name: (data, status, code) for name, (data, (status, code)) in cases.items()}


CASE_NAMES = list(_cases(0))


@pytest.mark.parametrize("name", CASE_NAMES)
async def test_hostile_request_gets_its_documented_answer(
    hostile_target: UnprivilegedProxy, name: str
) -> None:
    """The request is answered with its documented status and a schema-valid JSON error."""
    data, status, code = _cases(hostile_target.port)[name]
    answer = await send_raw(hostile_target.port, data, timeout=30)
    assert answer.status == status, answer
    if code is None:
        assert answer.headers["content-type"] == "application/x-ndjson"
        assert json.loads(_last_event(answer))["type"] == "exit"
    else:
        error = json.loads(answer.body)
        assert list(ERROR_BODY.iter_errors(error)) == []
        assert answer.error()["code"] == code


def _last_event(answer: RawAnswer) -> bytes:
    """The last NDJSON line of a chunked body."""
    lines = [line for line in answer.body.split(b"\n") if line.startswith(b"{")]
    return lines[-1]


async def test_pipelined_requests_are_each_answered(hostile_target: UnprivilegedProxy) -> None:
    """Two requests in one write on a keep-alive connection: two answers, in order."""
    port = hostile_target.port
    first = request_bytes(port, "GET", "/healthz", b"").replace(b"Connection: close\r\n", b"")
    second = request_bytes(port, "GET", "/status", b"")
    answer = await send_raw(port, first + second, timeout=30)
    assert answer.status == 200
    assert b'{"status": "ok"}' in answer.body
    assert b'"backend": "local"' in answer.body


def test_the_hostile_run_logged_no_traceback(hostile_target: UnprivilegedProxy) -> None:
    """After every hostile request, the log holds no error and no traceback."""
    assert hostile_target.problems_in_log() == []
