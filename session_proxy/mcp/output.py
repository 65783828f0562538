"""A command's output as an agent sees it: whole lines, stderr marked, cut in the middle when too long.

Memory stays bounded whatever the command prints: only the first and the last
``limit`` characters are kept, and the rest is counted. Each stream has its own incremental
decoder, so a character split across chunks is reassembled, and bytes that are not UTF-8
become U+FFFD; the byte counts the exec API reports stay exact. Each stream's output is
passed on a whole line at a time (a line longer than ``PARTIAL_LINE_CHARS`` in pieces), so
two streams never split each other's lines, and every stderr line starts with
``STDERR_MARK``: a model can tell an error message from the data it asked for.
"""

from __future__ import annotations

import codecs
from typing import Final, Literal

Stream = Literal["stdout", "stderr"]
STREAMS: Final[tuple[Stream, Stream]] = ("stdout", "stderr")
STDERR_MARK: Final = "[stderr] "
PARTIAL_LINE_CHARS: Final = 4096
PROGRESS_LINES: Final = 10
PROGRESS_CHARS: Final = 1500


class OutputDigest:
    """Head and tail of the interleaved output, with exact character counts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._decoders = {
            stream: codecs.getincrementaldecoder("utf-8")(errors="replace") for stream in STREAMS
        }
        self._partial: dict[Stream, str] = dict.fromkeys(STREAMS, "")
        self._stderr_line_open = False  # the last stderr text passed on ended mid-line
        self._ends_mid_line = False
        self._last_stream: Stream | None = None
        self._head: list[str] = []
        self._head_chars = 0
        self._tail = ""
        self._dropped = 0
        self.chars = 0

    def feed(self, stream: Stream, data: bytes, *, final: bool = False) -> None:
        pending = self._partial[stream] + self._decoders[stream].decode(data, final)
        whole = pending.rfind("\n") + 1
        if final or len(pending) - whole > PARTIAL_LINE_CHARS:
            whole = len(pending)
        self._partial[stream] = pending[whole:]
        self._pass_on(stream, pending[:whole])

    def finish(self) -> None:
        """Pass on what is still held back: a last line without newline, an incomplete character."""
        for stream in STREAMS:
            self.feed(stream, b"", final=True)

    def _pass_on(self, stream: Stream, text: str) -> None:
        if not text:
            return
        if stream != self._last_stream and self._ends_mid_line:
            self._append("\n")  # the other stream's unfinished line ends here, on screen
            self._stderr_line_open = False
        self._last_stream = stream
        if stream == "stderr":
            text = self._mark(text)
        self._ends_mid_line = not text.endswith("\n")
        self._append(text)

    def _mark(self, text: str) -> str:
        marked = text.replace("\n", "\n" + STDERR_MARK)
        if not self._stderr_line_open:
            marked = STDERR_MARK + marked
        if text.endswith("\n"):
            marked = marked[: -len(STDERR_MARK)]
        self._stderr_line_open = not text.endswith("\n")
        return marked

    def _append(self, text: str) -> None:
        self.chars += len(text)
        room = self.limit - self._head_chars
        if room > 0:
            self._head.append(text[:room])
            self._head_chars += min(room, len(text))
            text = text[room:]
        self._tail += text
        if len(self._tail) > 2 * self.limit:
            cut = len(self._tail) - self.limit
            self._dropped += cut
            self._tail = self._tail[cut:]

    @property
    def cut(self) -> bool:
        return self.chars > self.limit

    def text(self) -> str:
        """All of it, or the head and the tail (whole lines where lines allow) around a notice."""
        head = "".join(self._head)
        if not self.cut:
            return head + self._tail
        keep = self.limit // 2
        head = _whole_lines_from_start(head[:keep])
        tail = _whole_lines_to_end(self._tail[-(self.limit - keep) :])
        left_out = self.chars - len(head) - len(tail)
        notice = (
            f"[... {left_out} of {self.chars} characters left out in the middle (the limit is "
            f"{self.limit}). To see all of it, write the output to a file, e.g. "
            "`cmd >/tmp/out.log 2>&1`, then read parts of it with head, tail, grep or sed -n ...]\n"
        )
        return head + ("" if head.endswith("\n") else "\n") + notice + tail

    def last_lines(self) -> str:
        """The newest output, a few lines of it (an unfinished line too), for a progress message."""
        recent = self._tail
        if len(recent) < PROGRESS_CHARS and not self._dropped:
            recent = "".join(self._head)[-PROGRESS_CHARS:] + recent
        for stream in STREAMS:
            if self._partial[stream]:
                mark = STDERR_MARK if stream == "stderr" and not self._stderr_line_open else ""
                recent += (
                    ("\n" if recent and not recent.endswith("\n") else "") + mark + self._partial[stream]
                )
        recent = recent[-PROGRESS_CHARS:]
        lines = recent.rstrip("\n").split("\n")[-PROGRESS_LINES:]
        return "\n".join(lines)


def _whole_lines_from_start(text: str) -> str:
    """``text`` up to its last newline, unless that drops more than half of it (very long lines)."""
    end = text.rfind("\n") + 1
    return text[:end] if end > len(text) // 2 else text


def _whole_lines_to_end(text: str) -> str:
    """``text`` from just after its first newline, unless that drops more than half of it."""
    start = text.find("\n") + 1
    return text[start:] if 0 < start <= len(text) // 2 else text
