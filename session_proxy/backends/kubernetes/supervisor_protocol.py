"""The workspace supervisor's protocol: a static program in the pod, fed a binary header.

Where the workspace pod carries the supervisor (an init container copies it into an
``emptyDir`` mounted read-only at ``SUPERVISOR_DIR``), the proxy execs the constant argv
``[SUPERVISOR_PATH]`` instead of the shell wrapper and sends everything else over stdin: a
length-prefixed binary header (no escaping: each value is its bytes), exactly the user's stdin,
then control requests (``END_REQUEST``: TERM, then KILL after the grace), so ending a command
needs no second exec. It reports with the wrapper's nonce-carrying markers (``wrapper.py``'s
``MarkerFilter`` reads both), plus ``left:0|1`` after the exit. Its C source, with the header
layout, is ``supervisor/`` in the repository.
"""

from __future__ import annotations

import struct
from typing import Final

from .wrapper import to_bytes

SUPERVISOR_DIR: Final = "/session-proxy"
SUPERVISOR_PATH: Final = f"{SUPERVISOR_DIR}/workspace-supervisor"
# Run once per pod: the supervisor answers with VERSION_LINE and exits; an image without it
# gets the runtime's "no such file or directory" (and the shell wrapper).
PROBE_ARGV: Final = [SUPERVISOR_PATH, "--version"]
VERSION_LINE: Final = b"session-proxy workspace-supervisor SPB1\n"
MAGIC: Final = b"SPB1"
END_REQUEST: Final = b"T"


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value + b"\0"


def encode_header(
    *,
    nonce: str,
    argv: list[str],
    workdir: str | None,
    env: dict[str, str],
    stdin_length: int,
    deadline: float,
    grace: float,
) -> bytes:
    """The header for one command; ``deadline`` and ``grace`` in seconds (sent as ms)."""
    body = b"".join(
        [
            nonce.encode("ascii"),
            struct.pack(
                ">IIQII",
                max(1, min(round(deadline * 1000), 2**32 - 1)),
                max(0, min(round(grace * 1000), 2**32 - 1)),
                stdin_length,
                len(env),
                len(argv),
            ),
            _string(to_bytes(workdir or "")),
            *(_string(to_bytes(f"{name}={value}")) for name, value in env.items()),
            *(_string(to_bytes(argument)) for argument in argv),
        ]
    )
    return MAGIC + struct.pack(">I", len(body)) + body
