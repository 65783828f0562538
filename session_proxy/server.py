"""Listeners, signals and graceful shutdown around the two applications.

First SIGTERM/SIGINT: new execs get 503 ``shutting_down`` (the exec port keeps answering until
exit, so clients see why), execs not started yet end at once, running ones may finish for
``--shutdown-grace`` seconds, then the rest are ended (``reason: shutdown``); exit 0. A second
signal skips the wait. Every phase is bounded, so the whole stop takes at most
``--shutdown-grace`` + ``--kill-grace`` + ``SHUTDOWN_SLACK`` + ``HANDLER_SHUTDOWN_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
from pathlib import Path
from typing import Final

from aiohttp import web

from .app import create_app, create_ops_app
from .backends.base import ExecBackend
from .http_protocol import ProxyAppRunner
from .keys import JOBS, SUPERVISOR
from .log_throttle import LogThrottle
from .settings import Settings, TcpAddress, UnixAddress

log = logging.getLogger(__name__)

# After the grace, ended execs get the kill grace plus this to send their exit event and clean
# up; then aiohttp cancels handlers still running after HANDLER_SHUTDOWN_TIMEOUT (its default,
# 60 s, would outlast Kubernetes' 30 s termination grace).
SHUTDOWN_SLACK: Final = 2.0
HANDLER_SHUTDOWN_TIMEOUT: Final = 1.0

# Parser limits well under aiohttp's defaults: no legitimate client sends big headers here.
SERVER_OPTIONS = {
    "handler_cancellation": True,  # a client that hangs up cancels its exec at once
    "max_line_size": 8190,
    "max_field_size": 8190,
    "max_headers": 64,
    "keepalive_timeout": 30,
    "auto_decompress": False,
    "access_log": None,
    "shutdown_timeout": HANDLER_SHUTDOWN_TIMEOUT,
}


class ProxyServer:
    def __init__(self, settings: Settings, *, backend: ExecBackend | None = None) -> None:
        self.settings = settings
        self.exec_app = create_app(settings, backend=backend)
        self._log_throttle = LogThrottle()
        self._runners: list[web.AppRunner] = []
        self._exec_runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._signals = 0
        self.exec_url = ""
        self.ops_url: str | None = None

    def _runner(self, app: web.Application) -> web.AppRunner:
        # A refused body is still read (and dropped) for at most --body-timeout, then closed.
        options = {**SERVER_OPTIONS, "lingering_time": self.settings.body_timeout}
        return ProxyAppRunner(app, **options)  # type: ignore[arg-type]

    async def start(self) -> None:
        self._log_throttle.install()
        runner = self._runner(self.exec_app)
        await runner.setup()
        self._runners.append(runner)
        self._exec_runner = runner
        await self._bind_exec(runner)
        ops = self.settings.ops_address
        if ops is not None:
            ops_runner = self._runner(create_ops_app(self.exec_app))
            await ops_runner.setup()
            self._runners.append(ops_runner)
            site = web.TCPSite(ops_runner, ops.host, ops.port)
            await site.start()
            self.ops_url = _url(ops_runner.addresses[-1])
        log.info(
            "listening",
            extra={
                "exec_url": self.exec_url,
                "ops_url": self.ops_url,
                "backend": self.settings.backend,
            },
        )

    async def _bind_exec(self, runner: web.AppRunner) -> None:
        address = self.settings.listen_address
        if isinstance(address, UnixAddress):
            _remove_stale_socket(Path(address.path))
            await web.UnixSite(runner, address.path).start()
            os.chmod(address.path, self.settings.unix_socket_mode)
            self.exec_url = f"unix:{address.path}"
            return
        assert isinstance(address, TcpAddress)
        if not address.is_loopback:
            log.warning(
                "the exec API listens on a non-loopback address: anyone who reaches it can run "
                "commands (--unsafe-listen-any-address)",
                extra={"listen": self.settings.listen},
            )
        await web.TCPSite(runner, address.host, address.port).start()
        self.exec_url = _url(runner.addresses[-1])

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping: draining running execs")
            self._stop.set()
        else:
            log.info("second signal: ending running execs now")
            self.exec_app[SUPERVISOR].force()

    async def stop(self) -> None:
        """Refuse new execs (503), drain, then close everything (probes answer until the end).

        Safe to call again, even while a stop is under way: every caller waits for the one stop.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain_and_close())
        await asyncio.shield(self._stopping)

    async def _drain_and_close(self) -> None:
        settle = self.settings.kill_grace + SHUTDOWN_SLACK
        self.exec_app[JOBS].stop_all()  # jobs end with the proxy, at once (reason shutdown)
        await self.exec_app[SUPERVISOR].drain(self.settings.shutdown_grace, settle=settle)
        await self._close()
        log.info("stopped")

    async def _close(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self._log_throttle.uninstall()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            try:
                await self.start()
            except BaseException:
                await self._close()  # nothing ran: no drain, no "stopped"
                raise
            try:
                await self._stop.wait()
            finally:
                await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)


def _url(address: object) -> str:
    assert isinstance(address, tuple)
    host, port = str(address[0]), int(address[1])
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a previous run would make the bind fail; anything else is kept."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
