"""Raw-socket HTTP for tests: bytes exactly as written, answers parsed by hand."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """The JSON error body, after checking it is one."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        detail: dict[str, Any] = json.loads(self.body)["error"]
        assert detail["code"], detail
        assert detail["message"], detail
        return detail


def parse_answer(data: bytes) -> RawAnswer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(status_line.split()[1]), headers, body)


async def send_raw(port: int, data: bytes, timeout: float = 10) -> RawAnswer:
    """Send ``data`` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return parse_answer(await asyncio.wait_for(reader.read(), timeout=timeout))
    finally:
        writer.close()
        await writer.wait_closed()


def request_bytes(
    port: int,
    method: str = "POST",
    target: str = "/exec",
    body: bytes = b'{"command": ["true"]}',
    *,
    version: str = "HTTP/1.1",
    host: str | None = "127.0.0.1:{port}",
    extra: str = "",
    content_length: int | None = None,
) -> bytes:
    """A request with a JSON body and ``Connection: close``; ``extra`` holds further header lines."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append("Host: " + host.format(port=port))
    lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    lines.append("Connection: close")
    head = "\r\n".join(lines) + "\r\n" + extra.replace("\n", "\r\n")
    return head.encode("latin-1") + b"\r\n" + body
