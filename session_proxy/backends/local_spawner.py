"""The proxy's side of the local spawner (see ``spawner``): the helper, a leader, their descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from typing import Any, Final

from .spawner import READY

SPAWNER_MODULE: Final = "session_proxy.backends.spawner"
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 5.0
STOPPED_STATES: Final = frozenset("Tt")  # /proc/<pid>/stat: stopped, or stopped by a tracer


class Spawner:
    """The running helper process; ``request`` hands it the descriptors of one new command."""

    def __init__(self, process: asyncio.subprocess.Process, requests: socket.socket) -> None:
        self._process = process
        self._requests = requests

    @classmethod
    async def start(cls) -> Spawner:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # -P: never import from the working directory; cwd "/" is no workspace either. Its
            # own session keeps a terminal's Ctrl-C (meant for the proxy) away from it.
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", SPAWNER_MODULE,
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL, cwd="/", start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        ours.setblocking(False)
        spawner = cls(process, ours)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                ready = await asyncio.get_running_loop().sock_recv(ours, len(READY))
        except BaseException:
            await spawner.close()
            raise
        if ready != READY:
            await spawner.close()
            raise RuntimeError(f"the local process spawner did not start (exit {process.returncode})")
        return spawner

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        """Not ended: it sends nothing after ``ready``, so EOF on its socket means it is gone
        (known at once, before the child watcher has its exit status)."""
        if self._process.returncode is not None or self._requests.fileno() < 0:
            return False
        try:
            return bool(self._requests.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return True
        except OSError:
            return False

    def stopped(self) -> bool:
        """Stopped (SIGSTOP, a debugger): it forks no leader until it is continued."""
        return process_state(self._process.pid) in STOPPED_STATES

    def kill(self) -> None:
        """End a stuck spawner: requests still queued on its socket are dropped with it, so
        their leaders never start and their channels reach EOF (nothing ran)."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()

    async def request(self, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(self._requests, [b"S"], fds)
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self._requests, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self._requests)

    async def close(self) -> None:
        """EOF ends the spawner; leaders of running commands end with their own channels."""
        self._requests.close()
        if self.stopped():
            self.kill()  # a stopped process reads no EOF
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self._process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("" if the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return ""
    return text[text.rfind(")") + 2 : text.rfind(")") + 3]


class LeaderChannel:
    """JSON lines to and from one command's leader over a stream socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, sock: socket.socket) -> LeaderChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, message: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the leader is gone (or sent garbage)."""
        try:
            line = await self._reader.readline()
            message = json.loads(line) if line else None
        except (ConnectionError, ValueError):
            return None
        return message if isinstance(message, dict) else None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


class CommandPipes:
    """The descriptors of one command: the proxy's ends and the ends handed to its leader.

    Opening them may fail half-way (EMFILE when the proxy is out of descriptors): whatever was
    opened by then is closed again before the error propagates, so a refusal leaks nothing.
    """

    def __init__(self, with_stdin: bool) -> None:
        opened: list[int] = []
        try:
            self.stdout, stdout_child = _opened(opened, os.pipe())
            self.stderr, stderr_child = _opened(opened, os.pipe())
            if with_stdin:
                stdin_child, self.stdin = _opened(opened, os.pipe())
            else:
                opened.append(stdin_child := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
                self.stdin = -1
            control, control_child = socket.socketpair()
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        self.control = control
        self.for_leader = [stdin_child, stdout_child, stderr_child, control_child.detach()]

    def close_leader_ends(self) -> None:
        for fd in self.for_leader:
            os.close(fd)
        self.for_leader = []

    def take_stdout(self) -> int:
        fd, self.stdout = self.stdout, -1
        return fd

    def take_stderr(self) -> int:
        fd, self.stderr = self.stderr, -1
        return fd

    def take_stdin(self) -> int:
        fd, self.stdin = self.stdin, -1
        return fd

    def close_ours(self, *, control: bool = True) -> None:
        """Close the proxy's ends not yet handed on (the control socket only if asked)."""
        for fd in (self.take_stdout(), self.take_stderr(), self.take_stdin()):
            if fd >= 0:
                os.close(fd)
        if control:
            self.control.close()


def _opened(opened: list[int], pair: tuple[int, int]) -> tuple[int, int]:
    """Note a new pipe's two descriptors for clean-up, and hand them on."""
    opened.extend(pair)
    return pair
