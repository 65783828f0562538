"""One exec WebSocket: Kubernetes' remotecommand channel protocol, kept alive with pings.

Every message is ``[channel][payload]``: 0 stdin, 1 stdout, 2 stderr, 3 the final ``Status``
(JSON), and on v5 only 255, CLOSE (``[255][0]`` half-closes stdin). Each output channel starts
with an empty frame. No other module decodes frames.

Pings go out every ``ping_interval`` seconds (client-go does so every 5 s), so no idle timer on
the way (a load balancer, a NAT, an API server before kubernetes/kubernetes#130126) cuts a
command that prints nothing for minutes. A peer that stays silent, pongs included, for
``ping_timeout`` while we wait for it is gone. Time we spend not reading (a slow client holds
the stream back) does not count: the peer's frames then wait in our buffers, they are not
missing. (aiohttp's own ``heartbeat=`` does send pings, but only after ``heartbeat`` seconds
without *received* data, and closes the connection when no pong comes within half that, so the
window cannot be set apart from the interval; and while a slow client holds reading back, the
paused transport hides the pong and a live stream would be dropped.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from typing import Final

import aiohttp

from ...tasks import cancel_and_wait
from ..base import ExitStatus

V5: Final = "v5.channel.k8s.io"
V4: Final = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, STATUS, CLOSE = 0, 1, 2, 3, 255
STDIN_FRAME: Final = 256 * 1024
STATUS_LIMIT: Final = 64 * 1024
CLOSE_TIMEOUT: Final = 5.0
_TRANSPORT_ERRORS: Final = (ConnectionError, aiohttp.ClientError, RuntimeError)


def parse_status(raw: bytes) -> ExitStatus | None:
    """Channel-3 status: exit code only from the ExitCode cause of NonZeroExitCode."""
    if not raw.strip():
        return None
    try:
        status = json.loads(raw)
    except ValueError:
        return ExitStatus(None, reason="error", message=raw.decode("utf-8", "replace")[:300])
    if not isinstance(status, dict):
        return ExitStatus(None, reason="error", message="the exec status is not a Status object")
    if status.get("status") == "Success":
        return ExitStatus(0)
    if status.get("reason") == "NonZeroExitCode":
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                with contextlib.suppress(ValueError):
                    code = int(cause.get("message", ""))
                    if 0 <= code <= 255:
                        return ExitStatus(code)
    message = str(status.get("message") or "the exec failed")[:300]
    return ExitStatus(None, reason="error", message=message)


class ExecStream:
    """Send stdin, half-close it (v5), receive ``(channel, bytes)``, then the parsed status."""

    def __init__(
        self, websocket: aiohttp.ClientWebSocketResponse, *, ping_interval: float, ping_timeout: float
    ) -> None:
        self._ws = websocket
        self.protocol: str = websocket.protocol or V4
        self._ping_timeout = ping_timeout
        self._status = bytearray()
        self._loop = asyncio.get_running_loop()
        self._heard = self._loop.time()
        self._ended = False
        self.peer_silent = False  # the peer stopped answering: the stream was given up
        self.frame_too_large = False
        self._pinger = asyncio.create_task(self._ping_every(ping_interval), name="exec-ping")

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def status(self) -> ExitStatus | None:
        """The exec's own status (channel 3), once the stream has ended; None if it sent none."""
        return parse_status(bytes(self._status))

    async def send_stdin(self, data: bytes) -> bool:
        """Send bytes to the command's stdin, in frames; False if the stream is gone."""
        try:
            for offset in range(0, len(data), STDIN_FRAME):
                await self._ws.send_bytes(bytes([STDIN]) + data[offset : offset + STDIN_FRAME])
        except _TRANSPORT_ERRORS:
            return False
        return True

    async def close_stdin(self) -> bool:
        """v5: end the command's stdin (it reads EOF). False on v4, which has no way to."""
        if self.protocol != V5:
            return False
        try:
            await self._ws.send_bytes(bytes([CLOSE, STDIN]))
        except _TRANSPORT_ERRORS:
            return False
        return True

    async def receive(self) -> tuple[int, bytes] | None:
        """The next stdout or stderr payload as ``(channel, bytes)``; None once the stream is over."""
        waiting_since = self._loop.time()
        while not self._ended:
            left = self._ping_timeout - (self._loop.time() - max(self._heard, waiting_since))
            try:
                if left <= 0:
                    raise TimeoutError
                message = await self._ws.receive(timeout=left)
            except TimeoutError:
                self.peer_silent = True
                await self.close()
                return None
            self._heard = self._loop.time()
            if message.type == aiohttp.WSMsgType.BINARY:
                data: bytes = message.data
                if len(data) < 2:
                    continue  # the empty first frame of a channel
                channel, payload = data[0], data[1:]
                if channel in (STDOUT, STDERR):
                    return channel, payload
                if channel == STATUS and len(self._status) < STATUS_LIMIT:
                    self._status += payload
            elif message.type == aiohttp.WSMsgType.PING:
                with contextlib.suppress(*_TRANSPORT_ERRORS):
                    await self._ws.pong(message.data)
            elif message.type not in (aiohttp.WSMsgType.PONG, aiohttp.WSMsgType.TEXT):
                self._ended = True  # CLOSE, CLOSED, ERROR: the stream is over
                self.frame_too_large = self._ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        return None

    def heard_within(self, seconds: float) -> bool:
        """Whether the peer was heard from (the upgrade, any frame, a pong) in the last ``seconds``."""
        return self._loop.time() - self._heard <= seconds

    async def answers_ping(self, timeout: float) -> bool:
        """Ping, and wait up to ``timeout`` seconds for that ping's pong: the peer is there now.

        For a stream nobody else reads (a warm exec waiting for its header): output or the
        stream's end meanwhile is False (``ended`` then tells which), and so is silence
        (``peer_silent`` is then set)."""
        payload = secrets.token_bytes(8)
        try:
            await self._ws.ping(payload)
            async with asyncio.timeout(timeout):
                while True:
                    message = await self._ws.receive()
                    self._heard = self._loop.time()
                    if message.type == aiohttp.WSMsgType.PONG and message.data == payload:
                        return True
                    if message.type == aiohttp.WSMsgType.PING:
                        await self._ws.pong(message.data)
                    elif message.type == aiohttp.WSMsgType.BINARY:
                        if len(message.data) >= 2:
                            return False  # output (or a status) where nothing may come yet
                    elif message.type not in (aiohttp.WSMsgType.PONG, aiohttp.WSMsgType.TEXT):
                        self._ended = True
                        return False
        except TimeoutError:
            self.peer_silent = True
            return False
        except _TRANSPORT_ERRORS:
            self._ended = True
            return False

    async def _ping_every(self, interval: float) -> None:
        while not self._ws.closed:
            await asyncio.sleep(interval)
            try:
                await self._ws.ping()
            except _TRANSPORT_ERRORS:
                return

    async def close(self) -> None:
        """Close the WebSocket (for the wrapper: stdin EOF, its cue to end what is left)."""
        self._ended = True
        try:
            await cancel_and_wait(self._pinger)
        finally:  # a cancelled caller still closes the socket
            with contextlib.suppress(TimeoutError, *_TRANSPORT_ERRORS):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._ws.close()
