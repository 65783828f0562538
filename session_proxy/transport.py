"""Connection-level bounds that aiohttp does not give: a client that stops reading is let go.

Writes to a response only wait while the transport's buffer is over its high-water mark, so
the last events of a stream (a few hundred bytes) are always accepted into the buffer at once,
even when the client has stopped reading. Nothing would then ever end that connection: the
handler returns, and closing a transport with buffered data waits for the data to be sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

log = logging.getLogger(__name__)

# How often the buffer is looked at; only connections still holding unsent bytes are polled.
DRAIN_POLL_INTERVAL: Final = 0.05


async def drain_or_abort(transport: asyncio.BaseTransport | None, timeout: float) -> bool:
    """Wait until everything written has been handed to the kernel; else abort the connection.

    Returns True when the buffer drained (or the connection is already gone), False when the
    connection was aborted because the client did not take the data within ``timeout`` seconds.
    """
    if not isinstance(transport, asyncio.WriteTransport):
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while transport.get_write_buffer_size() > 0:
        if loop.time() >= deadline:
            log.info(
                "closing a connection whose client does not read",
                extra={"unsent_bytes": transport.get_write_buffer_size()},
            )
            transport.abort()
            return False
        await asyncio.sleep(DRAIN_POLL_INTERVAL)
    return True


def abort_if_unsent(transport: asyncio.BaseTransport, timeout: float) -> None:
    """A connection is done with: give its unsent bytes ``timeout`` seconds to leave, then abort.

    Closing a transport waits until its buffer is sent, which for a client that stopped
    reading is never: the socket, its buffer and the fd would be held for the proxy's life.
    """
    if not isinstance(transport, asyncio.WriteTransport) or transport.get_write_buffer_size() == 0:
        return
    asyncio.get_running_loop().call_later(timeout, _abort_if_still_unsent, transport)


def _abort_if_still_unsent(transport: asyncio.WriteTransport) -> None:
    if transport.get_write_buffer_size() > 0:
        log.info(
            "closing a connection whose client does not read",
            extra={"unsent_bytes": transport.get_write_buffer_size()},
        )
        transport.abort()
