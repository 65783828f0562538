"""Lossless splitting of a byte stream into UTF-8 text and base64 pieces.

Pipes cut output anywhere, including inside a multi-byte character. The incomplete tail of a
chunk is held back until the next chunk completes it; bytes that can never be valid UTF-8 are
sent as base64, so every byte reaches the client exactly once and in order.
"""

from __future__ import annotations

import base64
import codecs
from typing import Final, Literal

PieceKind = Literal["data", "data_b64"]
Piece = tuple[PieceKind, str]
MAX_SEQUENCE: Final = 4


def _is_incomplete_prefix(tail: bytes) -> bool:
    """True if ``tail`` could still become a valid character with more bytes."""
    if not tail or len(tail) >= MAX_SEQUENCE:
        return False
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(tail, final=False) == ""
    except UnicodeDecodeError:
        return False


class Utf8Splitter:
    """Per-stream state: at most three held-back bytes."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[Piece]:
        data = self._pending + chunk if self._pending else chunk
        self._pending = b""
        try:
            return [("data", data.decode("utf-8"))] if data else []
        except UnicodeDecodeError as error:
            return self._split(data, error)

    def _split(self, data: bytes, error: UnicodeDecodeError) -> list[Piece]:
        pieces: list[Piece] = []
        if error.start:
            pieces.append(("data", data[: error.start].decode("utf-8")))
        rest = data[error.start :]
        for cut in range(max(0, len(rest) - MAX_SEQUENCE + 1), len(rest)):
            if _is_incomplete_prefix(rest[cut:]):
                self._pending = rest[cut:]
                rest = rest[:cut]
                break
        if rest:
            pieces.append(("data_b64", base64.b64encode(rest).decode("ascii")))
        return pieces

    def flush(self) -> list[Piece]:
        """At end of stream, an incomplete character is invalid: send its bytes as base64."""
        pending, self._pending = self._pending, b""
        return [("data_b64", base64.b64encode(pending).decode("ascii"))] if pending else []
