"""The wrapper protocol: a fixed shell script in the workspace, fed its inputs over stdin.

Kubernetes exec has no workdir, env or kill, cannot send stdin EOF on v4, and puts the argv in
the URL (and so in the API server's audit log). So the exec URL only ever says
``/bin/sh -c WRAPPER_SCRIPT``; everything the caller chose travels over stdin as a header,
every value escaped byte by byte as ``\\0ooo`` so the script recovers it with ``printf %b``,
which decodes data and never evaluates it. The user's stdin bytes follow the header.

The script runs the command in its own session (``setsid``), reports its process group and,
later, its exit status as markers on stderr that carry a random per-exec nonce (the command
never sees the nonce, so it cannot forge them). It kills the group itself when its own stdin
reaches EOF (the proxy or its client is gone, even if the proxy crashed) and when the deadline
passes. Needs only POSIX sh with ``setsid``, ``head``, ``cat`` and ``sleep``; works in dash,
bash and busybox.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

PROTOCOL_TAG: Final = "SP1"
MARKER_DELIMITER: Final = b"\x1e"
SHELL: Final = "/bin/sh"

# $1..: nothing. All inputs come from stdin; see encode_header for the order.
WRAPPER_SCRIPT: Final = r"""
d() { v=$(printf '%bx' "$1"); v=${v%x}; }
r() { IFS= read -r "$1" || exit 90; }
r tag; r nonce; r deadline; r grace; r nstdin; r wd; r n
[ "$tag" = SP1 ] || exit 91
mk() { printf '\036SP%s:%s\036' "$nonce" "$1" >&2; }
while [ "$n" -gt 0 ]; do r e; d "$e"; export "$v" || { mk error:env; exit 0; }; n=$((n-1)); done
r n; set --
while [ "$n" -gt 0 ]; do r e; d "$e"; set -- "$@" "$v"; n=$((n-1)); done
if [ -n "$wd" ]; then d "$wd"; cd "$v" 2>/dev/null || { mk error:workdir; exit 0; }; fi
command -v "$1" >/dev/null 2>&1 || { mk error:notfound; exit 0; }
main=$$ stop=
trap 'stop=gone' USR1
trap 'stop=deadline' USR2
# An asynchronous list reads /dev/null unless told otherwise (POSIX), so stdin goes via fd 3.
# The feeder hands the command exactly nstdin bytes, then leaves the dead-man switch behind
# (outside the job, so `wait` is about the command alone): EOF on our stdin ends the group.
exec 3<&0
# Without setsid (a rare image) the command runs in our group: only it can be killed, not its
# children; the start event then says kill is not guaranteed.
S=setsid; command -v setsid >/dev/null 2>&1 || S=
# (exec redirections, not `{ } 2>...`: dash would keep the real stderr on a saved fd that the
# dead-man inherits, holding the stream open.)
if [ "$nstdin" -gt 0 ]; then
  ( exec 2>/dev/null; head -c "$nstdin" <&3; exec >&-; { cat <&3 >/dev/null; kill -USR1 "$main"; } & ) |
    $S "$@" 3<&- &
  pid=$!
else  # no input: fewer processes, the same dead-man switch
  $S "$@" </dev/null 3<&- &
  pid=$!
  ( exec >/dev/null 2>&1; cat <&3; kill -USR1 "$main" ) &
fi
# From here on a report that cannot be written (the stream is gone) must not stop the clean-up.
trap '' PIPE
mk "pgid:$pid"
( exec </dev/null >/dev/null 2>&1 3<&-; trap 'kill "$s"; exit 0' TERM
  sleep "$deadline" & s=$!; wait "$s"; kill -USR2 "$main" ) &
timer=$!
# Spelled for dash too: its kill takes `-s SIG -- -PGID` and `-0 -PGID`, not `-TERM -- -PGID`.
end() {
  t=-$pid; [ -n "$S" ] || t=$pid
  kill -s TERM -- "$t" 2>/dev/null; i=0
  while kill -0 "$t" 2>/dev/null && [ "$i" -lt "$grace" ]; do sleep 1; i=$((i+1)); done
  kill -s KILL -- "$t" 2>/dev/null
}
wait "$pid"; st=$?
if [ -n "$stop" ]; then end; wait "$pid"; st=$?; mk "$stop"; fi
mk "exit:$st"
kill "$timer" 2>/dev/null
end
exit 0
"""

# Lists the tools the wrapper needs that the image lacks (empty output: all there).
PROBE_SCRIPT: Final = (
    'for t in setsid head cat sleep; do command -v "$t" >/dev/null 2>&1 || printf "%s " "$t"; done'
)

# Kills a process group: stdin carries the group id and the grace, so the URL stays constant.
KILL_SCRIPT: Final = r"""
IFS= read -r p; IFS= read -r g
case "$p" in ''|*[!0-9]*) exit 2;; esac
t=-$p
kill -0 "$t" 2>/dev/null || t=$p  # not a group: the image had no setsid
kill -s TERM -- "$t" 2>/dev/null || exit 0
i=0
while kill -0 "$t" 2>/dev/null && [ "$i" -lt "$g" ]; do sleep 1; i=$((i+1)); done
kill -s KILL -- "$t" 2>/dev/null
exit 0
"""


def escape(value: bytes) -> str:
    """Every byte as ``\\0ooo``: plain ASCII that ``printf %b`` turns back into the bytes."""
    return "".join(f"\\0{byte:03o}" for byte in value)


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
) -> bytes:
    lines = [
        PROTOCOL_TAG,
        nonce,
        str(max(1, deadline)),
        str(max(0, grace)),
        str(stdin_length),
        escape(to_bytes(workdir)) if workdir else "",
        str(len(env)),
        *(escape(to_bytes(f"{name}={value}")) for name, value in env.items()),
        str(len(argv)),
        *(escape(to_bytes(argument)) for argument in argv),
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


@dataclass(frozen=True)
class Marker:
    kind: str  # pgid, exit, gone, deadline, error
    value: str


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
