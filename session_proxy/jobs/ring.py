"""One stream of a job's output: the newest bytes in a bounded ring, addressed by absolute offset.

A job writes for as long as it runs and nobody may be reading, so its output cannot be held
back (as an exec's is, by backpressure) nor kept whole. The ring keeps the last ``capacity``
bytes; the offset of a byte is its position in everything the stream ever wrote, so a reader
that comes back with an offset gets exactly the bytes after it, or learns how many it lost.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RingRead:
    """What a read found: ``lost`` bytes gone before ``offset``, then ``data`` from ``offset``."""

    lost: int
    offset: int
    data: bytes


class OutputRing:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Grows only as output arrives (a quiet job costs nothing); deleting from the front of a
        # bytearray moves a start index, not the bytes.
        self._buffer = bytearray()
        self._start = 0  # offset of the first byte still kept

    @property
    def start(self) -> int:
        """Offset of the oldest byte kept; also how many bytes fell out."""
        return self._start

    @property
    def end(self) -> int:
        """Offset just past the newest byte: how many bytes the stream wrote in all."""
        return self._start + len(self._buffer)

    def append(self, data: bytes) -> None:
        self._buffer += data
        excess = len(self._buffer) - self.capacity
        if excess > 0:
            del self._buffer[:excess]
            self._start += excess

    def read(self, offset: int, limit: int) -> RingRead:
        """At most ``limit`` bytes from ``offset`` (0 <= offset <= end, checked by the caller)."""
        lost = max(0, self._start - offset)
        begin = offset + lost
        index = begin - self._start
        return RingRead(lost, begin, bytes(self._buffer[index : index + limit]))
