"""The local backend's spawner: a helper process that starts each command under a leader.

Started once per backend (``python -m session_proxy.backends.spawner``) with a SOCK_SEQPACKET
socket as stdin. For each request (one byte carrying four descriptors: the command's stdin,
stdout and stderr, and a control socket) it forks a *leader*, which:

- is a child subreaper, so everything the command starts stays below it even after a
  ``setsid``/``setpgid`` and the death of its parent, and is reaped by it;
- reads the command (JSON: argv, cwd, env, start_by) from the control socket, runs it in a new
  session unless ``start_by`` (monotonic clock) has passed, and reports ``{"started": pid}`` or
  ``{"failed": stage, "errno", "strerror"}`` (stage ``deadline``, ``chdir`` or ``exec``), then
  ``{"exited": returncode}`` (negative: killed by that signal);
- on ``{"terminate": grace, "spare_detached": bool}`` ends its whole tree (TERM, grace, KILL),
  answers ``{"terminated": [pids that survived KILL]}`` and exits;
- on EOF of the control socket (the proxy closed it, or died, even by SIGKILL: the kernel
  closes a dead process's sockets) KILLs its whole tree and exits.

All this runs outside the proxy's process: the proxy forks nothing but this helper, so no
reaping here can take a child status that asyncio's child watcher waits for, and no /proc
walk blocks the proxy's event loop. Forking a leader from this small, single-threaded process
costs about a millisecond, where starting a Python interpreter per command would cost tens.
The spawner itself is a subreaper too: detached processes whose leader has exited are
re-parented to it and reaped. It exits when its socket reaches EOF. Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import select
import signal
import socket
import stat
import sys
import time
import traceback
from typing import Any, Final

from .process_tree import ProcessEntry, TreeEnder, holds_any

PR_SET_CHILD_SUBREAPER: Final = 36
REQUEST_FDS: Final = 4  # stdin, stdout, stderr, control
READY: Final = b"ready"
# Terminal signals (Ctrl-C, hang-up, quit) and TERM must not end the spawner or a leader before
# the proxy has ended the commands (EOF on their sockets ends them); commands get the defaults.
SIGNALS_IGNORED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SIGNALS_RESET_FOR_COMMANDS: Final = (*SIGNALS_IGNORED, signal.SIGPIPE, signal.SIGXFSZ)


def become_subreaper(libc: ctypes.CDLL) -> None:
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(error)}")


def reap_children() -> dict[int, int]:
    """Reap every child that has ended; pid -> return code (negative: killed by that signal)."""
    reaped: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = os.waitstatus_to_exitcode(status)


class ChildSignals:
    """SIGCHLD as a readable descriptor, so one ``select`` waits for children and messages."""

    def __init__(self) -> None:
        self.fd, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 512):
                pass


def close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def spawn_command(spec: dict[str, Any], stdio: tuple[int, int, int]) -> int:
    """Start the command in a session of its own with ``posix_spawnp`` (a vfork: far cheaper
    than forking Python); OSError if that fails. The leader, which serves this one command,
    has moved to the workdir already and takes the command's PATH, where ``posix_spawnp`` looks."""
    os.environ["PATH"] = spec["env"].get("PATH", os.defpath)
    return os.posix_spawnp(
        spec["argv"][0],
        spec["argv"],
        spec["env"],
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)],
        setsid=True,
        setsigdef=SIGNALS_RESET_FOR_COMMANDS,
        setsigmask=[],
    )


class Leader:
    """Runs one command and answers for everything it starts (see the module docstring)."""

    def __init__(self, stdio: tuple[int, int, int], control: int, libc: ctypes.CDLL) -> None:
        for fd in (*stdio, control):
            os.set_inheritable(fd, False)  # descriptors passed over a socket arrive inheritable
        self.stdio = stdio
        self.control = socket.socket(fileno=control)
        self.control.setblocking(True)
        self.command_pid = 0
        self.pipes = frozenset(os.fstat(fd).st_ino for fd in stdio if stat.S_ISFIFO(os.fstat(fd).st_mode))
        self.wakeup = ChildSignals()
        self.received = b""
        self.libc = libc

    def run(self) -> None:
        become_subreaper(self.libc)
        line = self.read_line()
        if line is None:
            return
        if not self.spawn(json.loads(line)):
            return
        while (line := self.read_line()) is not None:
            message = json.loads(line)
            if "terminate" in message:
                survivors = self.end_tree(float(message["terminate"]), bool(message["spare_detached"]))
                self.send({"terminated": survivors})
                return
        self.end_tree(0, spare_detached=False)  # the proxy is gone: nothing may outlive it

    def spawn(self, spec: dict[str, Any]) -> bool:
        stage = "deadline"
        try:
            if time.monotonic() >= spec.get("start_by", math.inf):
                raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))  # the proxy gave up
            stage = "chdir"
            os.chdir(spec["cwd"])
            stage = "exec"
            self.command_pid = spawn_command(spec, self.stdio)
        except OSError as error:
            self.send({"failed": stage, "errno": error.errno, "strerror": error.strerror})
            return False
        finally:
            for fd in self.stdio:
                os.close(fd)  # only the command holds its pipes, so their EOF means what it says
        self.send({"started": self.command_pid})
        return True

    def read_line(self) -> bytes | None:
        """The next message line from the proxy, reaping children meanwhile; None at EOF."""
        while b"\n" not in self.received:
            ready, _, _ = select.select([self.control.fileno(), self.wakeup.fd], [], [])
            if self.wakeup.fd in ready:
                self.reap()
            if self.control.fileno() in ready:
                try:
                    data = self.control.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    return None
                self.received += data
        line, _, self.received = self.received.partition(b"\n")
        return line

    def reap(self) -> None:
        self.wakeup.clear()
        for pid, returncode in reap_children().items():
            if pid == self.command_pid:
                self.send({"exited": returncode})

    def wait(self, seconds: float) -> None:
        select.select([self.wakeup.fd], [], [], seconds)
        self.reap()

    def detached(self, entry: ProcessEntry) -> bool:
        """Detached on purpose: its own session, and none of the command's pipes (stdin too:
        the proxy's end of it must not wait for a reader that never reads)."""
        return entry.sid != self.command_pid and not holds_any(entry.pid, self.pipes)

    def end_tree(self, grace: float, spare_detached: bool) -> list[int]:
        self.reap()
        spared = self.detached if spare_detached else (lambda entry: False)
        return TreeEnder(os.getpid(), self.wait, spared).end(grace)

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the proxy is gone; EOF will tell
            self.control.sendall(json.dumps(message).encode() + b"\n")


def start_leader(fds: list[int], libc: ctypes.CDLL) -> None:
    """In a fresh fork of the spawner: drop the spawner's descriptors and signals, lead."""
    signal.set_wakeup_fd(-1)
    close_all_but({1, 2, *fds})
    Leader((fds[0], fds[1], fds[2]), fds[3], libc).run()


def serve(requests: socket.socket) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    become_subreaper(libc)
    wakeup = ChildSignals()
    requests.sendall(READY)
    while True:
        ready, _, _ = select.select([requests.fileno(), wakeup.fd], [], [])
        if wakeup.fd in ready:
            wakeup.clear()
            reap_children()
        if requests.fileno() not in ready:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(requests, 16, REQUEST_FDS)
        except OSError:
            return
        if not message:
            return
        if len(fds) == REQUEST_FDS:
            fork_leader(fds, libc)
        for fd in fds:
            os.close(fd)


def fork_leader(fds: list[int], libc: ctypes.CDLL) -> None:
    if os.fork() == 0:
        code = 0
        try:
            start_leader(fds, libc)
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)


def main() -> None:
    for signum in SIGNALS_IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    requests = socket.socket(fileno=sys.stdin.fileno())
    serve(requests)


if __name__ == "__main__":
    main()
