"""Lossless splitting of a byte stream into UTF-8 text and base64 pieces.

Pipes cut output anywhere, including inside a multi-byte character. The stdlib's incremental
decoder holds the incomplete tail of a chunk back until the next chunk completes it; with
``surrogateescape`` each byte that can never be valid UTF-8 comes out as one lone surrogate
(valid UTF-8 never decodes to one), so exactly those bytes are sent as base64 and the text
around them stays text. A chunk that is binary (more than ``BINARY_RUNS`` runs of invalid
bytes, in its first ``PROBE_BYTES`` or in all of it) goes as one base64 piece instead: split
at every invalid byte, random data would become an event per few bytes. Every byte reaches
the client exactly once and in order.
"""

from __future__ import annotations

import base64
import codecs
import itertools
import re
from typing import Final, Literal

PieceKind = Literal["data", "data_b64"]
Piece = tuple[PieceKind, str]
ESCAPED_BYTES: Final = re.compile("([\udc80-\udcff]+)")
BINARY_RUNS: Final = 16
PROBE_BYTES: Final = 4096


def _looks_binary(probe: bytes) -> bool:
    return _looks_binary_text(probe.decode("utf-8", "surrogateescape"))


def _looks_binary_text(text: str) -> bool:
    """More than ``BINARY_RUNS`` runs of invalid bytes."""
    return len(list(itertools.islice(ESCAPED_BYTES.finditer(text), BINARY_RUNS + 1))) > BINARY_RUNS


def _pieces(text: str) -> list[Piece]:
    """Text runs as ``data``, runs of escaped bytes as ``data_b64``, in order."""
    if text.isascii() or not ESCAPED_BYTES.search(text):
        return [("data", text)] if text else []
    if _looks_binary_text(text):
        raw = text.encode("utf-8", "surrogateescape")
        return [("data_b64", base64.b64encode(raw).decode("ascii"))]
    pieces: list[Piece] = []
    for index, part in enumerate(ESCAPED_BYTES.split(text)):
        if not part:
            continue
        if index % 2:  # the captured separators: escaped bytes
            raw = part.encode("utf-8", "surrogateescape")
            pieces.append(("data_b64", base64.b64encode(raw).decode("ascii")))
        else:
            pieces.append(("data", part))
    return pieces


class Utf8Splitter:
    """Per-stream state: the decoder holds back at most three bytes of an incomplete character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")

    def feed(self, chunk: bytes) -> list[Piece]:
        if not chunk.isascii() and _looks_binary(chunk[:PROBE_BYTES]):
            # Decoding random bytes with surrogateescape is slow (one surrogate per bad byte):
            # a chunk whose start is binary goes as base64 whole, with any held-back bytes.
            pending, _ = self._decoder.getstate()
            self._decoder.reset()
            return [("data_b64", base64.b64encode(pending + chunk).decode("ascii"))]
        return _pieces(self._decoder.decode(chunk, final=False))

    def flush(self) -> list[Piece]:
        """At end of stream, an incomplete character is invalid: its bytes go as base64."""
        return _pieces(self._decoder.decode(b"", final=True))
