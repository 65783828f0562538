"""Ending every process a command started, found by walking the process tree from /proc.

This runs in the command's *leader* (see ``spawner``), a child subreaper: every orphan below it
is re-parented to it, so "what the command started" is exactly the leader's live descendants,
whatever process group or session they moved to. Blocking waits are fine here: the leader
serves one command and is not the proxy's event loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PROC: Final = Path("/proc")
POLL: Final = 0.02
KILL_CONFIRM_TIMEOUT: Final = 2.0
GONE_STATES: Final = frozenset("ZX")  # zombies and dead entries hold no resources but a pid


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str

    @property
    def alive(self) -> bool:
        return self.state not in GONE_STATES


def read_process(pid: int) -> ProcessEntry | None:
    """One process from /proc/<pid>/stat, or None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The fields after the command name, which is in parentheses and may contain anything.
    fields = stat[stat.rfind(")") + 2 :].split()
    return ProcessEntry(pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0])


def process_table() -> list[ProcessEntry]:
    entries = (read_process(int(entry.name)) for entry in PROC.iterdir() if entry.name.isdigit())
    return [entry for entry in entries if entry is not None]


def children_of(pid: int) -> list[int] | None:
    """Children of every thread of ``pid`` (/proc/<pid>/task/<tid>/children); None if the
    kernel does not offer that file."""
    found: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except FileNotFoundError:
            if task.exists():
                return None  # the thread is there, the file is not: no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return found


def live_descendants(root: int) -> list[ProcessEntry]:
    """Every live process below ``root`` (not ``root`` itself), parents before children."""
    found: list[ProcessEntry] = []
    frontier = [root]
    while frontier:
        below = children_of(frontier.pop())
        if below is None:
            return _live_descendants_from_table(root)
        entries = [entry for entry in map(read_process, below) if entry is not None]
        found.extend(entries)
        frontier.extend(entry.pid for entry in entries)
    return [entry for entry in found if entry.alive]


def _live_descendants_from_table(root: int) -> list[ProcessEntry]:
    """The same from a scan of all of /proc, for kernels without the ``children`` file."""
    children: dict[int, list[ProcessEntry]] = {}
    for entry in process_table():
        children.setdefault(entry.ppid, []).append(entry)
    found: list[ProcessEntry] = []
    frontier = [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found.extend(below)
        frontier.extend(entry.pid for entry in below)
    return [entry for entry in found if entry.alive]


def holds_any(pid: int, inodes: frozenset[int]) -> bool:
    """True if one of the process's open files is a pipe with one of these inode numbers."""
    wanted = {f"pipe:[{inode}]" for inode in inodes}
    try:
        fds = list((PROC / str(pid) / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in wanted:
                return True
        except OSError:
            continue
    return False


def send_signal(pid: int, sig: int) -> None:
    """Signal one process; one that is already gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


Sender = Callable[[int, int], None]
Waiter = Callable[[float], None]
Spared = Callable[[ProcessEntry], bool]


@dataclass
class TreeEnder:
    """TERM, a grace period, then KILL for every live descendant of ``root`` not ``spared``.

    ``wait(seconds)`` blocks until a child may have changed state (and reaps); ``send`` signals
    one process (injected so a test can play an unkillable process). New processes forked while
    this runs are found on the next walk: a subreaper sees them all.
    """

    root: int
    wait: Waiter
    spared: Spared = lambda entry: False
    send: Sender = send_signal

    def targets(self) -> list[ProcessEntry]:
        return [entry for entry in live_descendants(self.root) if not self.spared(entry)]

    def end(self, grace: float) -> list[int]:
        """End the tree; returns the pids still alive after KILL (normally none)."""
        if grace > 0 and self._terminate_within(grace):
            return []
        return self._kill()

    def _terminate_within(self, grace: float) -> bool:
        deadline = time.monotonic() + grace
        signalled: set[int] = set()
        while targets := self.targets():
            for entry in targets:
                if entry.pid not in signalled:
                    self.send(entry.pid, signal.SIGTERM)
                    self.send(entry.pid, signal.SIGCONT)  # a stopped process cannot act on TERM
                    signalled.add(entry.pid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.wait(min(POLL, remaining))
        return True

    def _kill(self) -> list[int]:
        deadline = time.monotonic() + KILL_CONFIRM_TIMEOUT
        while targets := self.targets():
            for entry in targets:
                self.send(entry.pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                return [entry.pid for entry in targets]
            self.wait(POLL)
        return []
