"""A read of a job's output from given offsets, as the events of the NDJSON answer.

Text stays text: a read that starts inside a character (after lost bytes) sends those stray
bytes on their own, and a character cut by the end of what has arrived is held back for the
next read (its offset is where the cursor stops), unless the job has ended: then it is sent
as base64, like every byte that is not UTF-8.
"""

from __future__ import annotations

import base64
from typing import Any, Final

from ..utf8 import Utf8Splitter
from .job import Job
from .ring import OutputRing

# Pieces fed to the UTF-8 splitter: after an invalid byte it sends the rest of a piece as
# base64, so pieces are kept as small as an exec's chunks.
PIECE_BYTES: Final = 64 * 1024
MAX_LEADING_CONTINUATION: Final = 3


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte <= 0xBF


def _pieces(data: bytes) -> list[bytes]:
    lead = 0
    while lead < min(len(data), MAX_LEADING_CONTINUATION) and _is_continuation(data[lead]):
        lead += 1
    parts = [data[:lead]] if lead else []
    parts += [data[i : i + PIECE_BYTES] for i in range(lead, len(data), PIECE_BYTES)]
    return parts


def read_stream(
    stream: str, ring: OutputRing, offset: int, limit: int, *, ended: bool
) -> tuple[list[dict[str, Any]], int]:
    """Events for up to ``limit`` bytes of ``stream`` from ``offset``, and the offset to go on from."""
    events: list[dict[str, Any]] = []
    found = ring.read(offset, limit)
    if found.lost:
        events.append({"type": "lost", "stream": stream, "offset": offset, "bytes": found.lost})
    splitter = Utf8Splitter()
    position = found.offset
    texts = [piece for part in _pieces(found.data) for piece in splitter.feed(part)]
    if ended and found.offset + len(found.data) == ring.end:
        texts += splitter.flush()
    for kind, text in texts:
        events.append({"type": stream, "offset": position, kind: text})
        position += len(text.encode()) if kind == "data" else len(base64.b64decode(text))
    return events, position


def read_job(job: Job, offsets: dict[str, int], limit: int) -> list[dict[str, Any]]:
    """Events for every stream from ``offsets`` (advanced in place)."""
    ended = job.exit is not None
    events: list[dict[str, Any]] = []
    for stream, ring in job.rings.items():
        found, offsets[stream] = read_stream(stream, ring, offsets[stream], limit, ended=ended)
        events += found
    return events


def read_to_end(job: Job, offsets: dict[str, int]) -> bool:
    """The job has ended and ``offsets`` are at the end of every stream."""
    return job.exit is not None and all(offsets[s] == ring.end for s, ring in job.rings.items())
