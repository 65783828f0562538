"""A local command's stdout and stderr pipes, read with flow control.

Output waiting for the client is capped: past HIGH_WATER the pipes are no longer read, so the
command blocks in write() until the client catches up (backpressure, bounded memory).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Final

from .base import OutputChunk, StreamName

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024


class PipeReader(asyncio.Protocol):
    """Hands one pipe's data and EOF to the shared ``CommandOutput``."""

    def __init__(self, output: CommandOutput, stream: StreamName) -> None:
        self._output = output
        self._stream = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self._output.attached(self._stream, transport)

    def data_received(self, data: bytes) -> None:
        self._output.received(OutputChunk(self._stream, data))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._output.closed(self._stream)


class CommandOutput:
    """An ``OutputSource``: output chunks in arrival order, and the exit learned out of band."""

    def __init__(self) -> None:
        self.exited = False
        self.chunks: deque[OutputChunk] = deque()
        self._pipes: dict[StreamName, asyncio.ReadTransport] = {}
        self._open: set[StreamName] = {"stdout", "stderr"}
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    async def connect(self, stdout: int, stderr: int) -> None:
        """Start reading the read ends of the command's stdout and stderr pipes (takes them)."""
        loop = asyncio.get_running_loop()
        for stream, fd in (("stdout", stdout), ("stderr", stderr)):
            pipe = os.fdopen(fd, "rb", buffering=0)
            await loop.connect_read_pipe(lambda stream=stream: PipeReader(self, stream), pipe)  # type: ignore[misc]

    def attached(self, stream: StreamName, transport: asyncio.ReadTransport) -> None:
        self._pipes[stream] = transport
        if self._paused:
            transport.pause_reading()

    def received(self, chunk: OutputChunk) -> None:
        self.chunks.append(chunk)
        self._buffered += len(chunk.data)
        if self._buffered >= HIGH_WATER and not self._paused:
            self._set_reading(False)
        self._wake()

    def closed(self, stream: StreamName) -> None:
        self._open.discard(stream)
        self._pipes.pop(stream, None)
        self._wake()

    def mark_exited(self) -> None:
        self.exited = True
        self._wake()

    @property
    def output_complete(self) -> bool:
        return True  # the pipes are read directly: nothing written before the exit is behind it

    @property
    def stream_open(self) -> bool:
        return bool(self._open)

    def take(self) -> OutputChunk | None:
        if not self.chunks:
            return None
        chunk = self.chunks.popleft()
        self._buffered -= len(chunk.data)
        if self._paused and self._buffered <= LOW_WATER:
            self._set_reading(True)
        return chunk

    async def changed(self) -> None:
        """Wait until output, EOF or the exit arrives."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        """Stop reading, even if an escaped child still holds the other ends."""
        for transport in list(self._pipes.values()):
            transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _set_reading(self, reading: bool) -> None:
        self._paused = not reading
        for transport in self._pipes.values():
            if not transport.is_closing():
                transport.resume_reading() if reading else transport.pause_reading()
