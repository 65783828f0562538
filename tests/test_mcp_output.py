"""How a command's output is shown to an agent: decoded per stream, cut in the middle, counted."""

from __future__ import annotations

import pytest

from session_proxy.mcp.output import OutputDigest

pytestmark = pytest.mark.timeout(10)


def test_a_character_split_across_chunks_survives_interleaving() -> None:
    """A UTF-8 character split between two stdout chunks is rebuilt even with stderr in between."""
    digest = OutputDigest(1000)
    digest.feed("stdout", "é".encode()[:1])
    digest.feed("stderr", b"err\n")
    digest.feed("stdout", "é".encode()[1:] + b"\n")
    digest.finish()
    assert digest.text() == "err\né\n"


def test_invalid_bytes_become_replacement_characters() -> None:
    """Bytes that are not UTF-8, and a character cut off at the very end, show as U+FFFD."""
    digest = OutputDigest(1000)
    digest.feed("stdout", b"a\xffb")
    digest.feed("stdout", "é".encode()[:1])
    digest.finish()
    assert digest.text() == "a\ufffdb\ufffd"


@pytest.mark.parametrize("chunk", [1, 7, 1000, 100_000])
def test_long_output_keeps_head_and_tail_and_counts_the_rest(chunk: int) -> None:
    """Past the limit the middle is left out; head and tail are exact and the count is right."""
    text = "".join(f"{i:06d}\n" for i in range(20_000))  # 140 000 characters
    digest = OutputDigest(1000)
    data = text.encode()
    for offset in range(0, len(data), chunk):
        digest.feed("stdout", data[offset : offset + chunk])
    digest.finish()
    shown = digest.text()
    head, notice, tail = shown.partition("\n[... ")
    assert head == text[:500]
    assert tail.endswith(text[-500:])
    assert tail.split("]\n", 1)[1] == text[-500:]
    assert notice == "\n[... "
    assert f"{len(text) - 1000} of {len(text)} characters left out" in shown
    assert digest.cut is True


def test_output_at_the_limit_is_whole() -> None:
    """Exactly the limit is not cut."""
    digest = OutputDigest(1000)
    digest.feed("stdout", b"x" * 1000)
    assert digest.text() == "x" * 1000
    assert digest.cut is False


def test_last_lines_are_the_newest_output() -> None:
    """A progress message shows the last few lines, also once the middle has been dropped."""
    digest = OutputDigest(1000)
    for i in range(5000):
        digest.feed("stdout", f"line {i}\n".encode())
    lines = digest.last_lines().split("\n")
    assert lines[-1] == "line 4999"
    assert len(lines) == 10
