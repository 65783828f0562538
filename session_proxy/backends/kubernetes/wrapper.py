"""The wrapper protocol: a fixed shell script in the workspace, fed its inputs over stdin.

Kubernetes exec has no workdir, env or kill, cannot send stdin EOF on v4, and puts the argv in
the URL (and so in the API server's audit log). So the exec URL only ever says
``/bin/sh -c WRAPPER_SCRIPT``; everything the caller chose travels over stdin as a header of
plain values the script stores and never evaluates: a short one on a line of its own, one with
a newline or a long one length-prefixed, so the script takes it in one read instead of byte
by byte. The user's stdin bytes follow the header.

The scripts are package files beside this module (``wrapper.sh`` documents the header and the
markers; ``kill.sh`` is the second exec that ends a group from outside; ``probe.sh`` lists the
tools an image lacks), linted by shellcheck. ``end_group.sh``, the one TERM, grace, KILL loop,
is put in front of both scripts that kill. They are read once, at import, with their comments
left out: the script travels in every exec URL.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Final

PROTOCOL_TAG: Final = "SP2"
HEADER_END: Final = "."
# Longer values go length-prefixed: the shell's `read` takes a pipe one byte per system call,
# `head -c` (one fork) takes the whole value at once.
LINE_VALUE_LIMIT: Final = 1024
# Seconds before what a command left in its group is ended (see wrapper.sh).
LEFTOVER_GRACE: Final = 1
MARKER_DELIMITER: Final = b"\x1e"
SHELL: Final = "/bin/sh"


def load_script(*names: str) -> str:
    """The named package scripts joined, without comment lines, blank lines or indentation.

    Safe because the scripts keep no multi-line strings; a comment is only ever a whole line.
    """
    package = resources.files(__name__.rpartition(".")[0])
    lines = []
    for name in names:
        for line in (package / name).read_text(encoding="utf-8").splitlines():
            code = line.strip()
            if code and not code.startswith("#"):
                lines.append(code)
    return "\n".join(lines) + "\n"


# All inputs come from stdin; see wrapper.sh (and encode_header) for the order.
WRAPPER_SCRIPT: Final = load_script("end_group.sh", "wrapper.sh")
# Stdin: the process group id, then the grace in seconds.
KILL_SCRIPT: Final = load_script("end_group.sh", "kill.sh")
# Prints the tools the wrapper needs that the image lacks (empty output: all there).
PROBE_SCRIPT: Final = load_script("probe.sh")


def encode_value(value: bytes) -> bytes:
    """``=TEXT\\n`` for a short value without a newline, else ``:LENGTH\\n`` and the raw bytes."""
    if len(value) <= LINE_VALUE_LIMIT and b"\n" not in value:
        return b"=" + value + b"\n"
    return b":%d\n" % len(value) + value


def to_bytes(text: str) -> bytes:
    # surrogateescape: a str that came from non-UTF-8 bytes goes back to those exact bytes.
    return text.encode("utf-8", "surrogateescape")


def new_nonce() -> str:
    return secrets.token_hex(16)


def encode_header(
    *,
    nonce: str,
    argv: list[str],
    workdir: str | None,
    env: dict[str, str],
    stdin_length: int,
    deadline: int,
    grace: int,
    leftover_grace: int = LEFTOVER_GRACE,
) -> bytes:
    numbers = (max(1, deadline), max(0, grace), max(0, leftover_grace), stdin_length)
    parts = [f"{PROTOCOL_TAG}\n{nonce}\n".encode("ascii")]
    parts += [b"%d\n" % number for number in numbers]
    parts.append(encode_value(to_bytes(workdir) if workdir else b""))
    parts.append(b"%d\n" % len(env))
    parts += [encode_value(to_bytes(f"{name}={value}")) for name, value in env.items()]
    parts.append(b"%d\n" % len(argv))
    parts += [encode_value(to_bytes(argument)) for argument in argv]
    parts.append(f"{HEADER_END}\n".encode("ascii"))
    return b"".join(parts)


@dataclass(frozen=True)
class Marker:
    kind: str  # pgid, exit, gone, deadline, error
    value: str


@dataclass(frozen=True)
class ExitReport:
    """An ``exit`` marker's value: the command's status, and whether its group was empty then
    (nothing of it left that could still write), as ``STATUS`` or ``STATUS:empty``."""

    status: int
    group_empty: bool

    @classmethod
    def parse(cls, value: str) -> ExitReport | None:
        status, _, flag = value.partition(":")
        if not status.isdigit() or flag not in ("", "empty"):
            return None
        return cls(int(status), flag == "empty")


class MarkerFilter:
    """Removes the wrapper's markers from stderr, byte-exactly, wherever reads cut them."""

    def __init__(self, nonce: str) -> None:
        self._start = MARKER_DELIMITER + b"SP" + nonce.encode() + b":"
        self._pending = b""

    def feed(self, data: bytes) -> tuple[bytes, list[Marker]]:
        buffer = self._pending + data if self._pending else data
        output: list[bytes] = []
        markers: list[Marker] = []
        while True:
            begin = buffer.find(self._start)
            if begin < 0:
                keep = self._partial_start(buffer)
                output.append(buffer[: len(buffer) - keep])
                self._pending = buffer[len(buffer) - keep :]
                break
            end = buffer.find(MARKER_DELIMITER, begin + len(self._start))
            if end < 0:
                output.append(buffer[:begin])
                self._pending = buffer[begin:]
                break
            output.append(buffer[:begin])
            body = buffer[begin + len(self._start) : end].decode("ascii", "replace")
            kind, _, value = body.partition(":")
            markers.append(Marker(kind, value))
            buffer = buffer[end + 1 :]
        return b"".join(output), markers

    def flush(self) -> bytes:
        pending, self._pending = self._pending, b""
        return pending

    def _partial_start(self, buffer: bytes) -> int:
        """Length of the longest tail of ``buffer`` that could begin a marker."""
        tail = buffer[-(len(self._start) - 1) :]
        position = tail.find(MARKER_DELIMITER)
        while position >= 0:
            if self._start.startswith(tail[position:]):
                return len(tail) - position
            position = tail.find(MARKER_DELIMITER, position + 1)
        return 0
