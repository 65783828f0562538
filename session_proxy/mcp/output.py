"""A command's output as an agent sees it: interleaved text, cut in the middle when too long.

Memory stays bounded whatever the command prints: only the first and the last
``limit`` characters are kept, and the rest is counted. Each stream has its own incremental
decoder, so a character split across chunks is reassembled, and bytes that are not UTF-8
become U+FFFD; the byte counts the exec API reports stay exact.
"""

from __future__ import annotations

import codecs
from typing import Final, Literal

Stream = Literal["stdout", "stderr"]
PROGRESS_LINES: Final = 10
PROGRESS_CHARS: Final = 1500


class OutputDigest:
    """Head and tail of the interleaved output, with exact character counts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._decoders = {
            stream: codecs.getincrementaldecoder("utf-8")(errors="replace") for stream in ("stdout", "stderr")
        }
        self._head: list[str] = []
        self._head_chars = 0
        self._tail = ""
        self._dropped = 0
        self.chars = 0

    def feed(self, stream: Stream, data: bytes, *, final: bool = False) -> None:
        self._append(self._decoders[stream].decode(data, final))

    def finish(self) -> None:
        """Flush what the decoders held back (an incomplete character at the very end)."""
        for stream in ("stdout", "stderr"):
            self.feed(stream, b"", final=True)

    def _append(self, text: str) -> None:
        if not text:
            return
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
        """All of it, or the head and the tail around a line saying how much was left out."""
        head = "".join(self._head)
        if not self.cut:
            return head + self._tail
        keep = self.limit // 2
        head = head[:keep]
        tail = self._tail[-(self.limit - keep) :]
        left_out = self.chars - len(head) - len(tail)
        notice = (
            f"\n[... {left_out} of {self.chars} characters left out in the middle (the limit is "
            f"{self.limit}). To see all of it, write the output to a file, e.g. "
            "`cmd >/tmp/out.log 2>&1`, then read parts of it with head, tail, grep or sed -n ...]\n"
        )
        return head + notice + tail

    def last_lines(self) -> str:
        """The newest output, a few lines of it, for a progress message."""
        recent = self._tail
        if len(recent) < PROGRESS_CHARS and not self._dropped:
            recent = "".join(self._head)[-PROGRESS_CHARS:] + recent
        recent = recent[-PROGRESS_CHARS:]
        lines = recent.rstrip("\n").split("\n")[-PROGRESS_LINES:]
        return "\n".join(lines)
