"""How a command's output is shown to an agent: decoded per stream, cut in the middle, counted."""

from __future__ import annotations

import pytest

from session_proxy.mcp.output import PARTIAL_LINE_CHARS, OutputDigest

pytestmark = pytest.mark.timeout(10)


def test_a_character_split_across_chunks_survives_interleaving() -> None:
    """A UTF-8 character split between two stdout chunks is rebuilt even with stderr in between."""
    digest = OutputDigest(1000)
    digest.feed("stdout", "é".encode()[:1])
    digest.feed("stderr", b"err\n")
    digest.feed("stdout", "é".encode()[1:] + b"\n")
    digest.finish()
    assert digest.text() == "[stderr] err\né\n"


def test_invalid_bytes_become_replacement_characters() -> None:
    """Bytes that are not UTF-8, and a character cut off at the very end, show as U+FFFD."""
    digest = OutputDigest(1000)
    digest.feed("stdout", b"a\xffb")
    digest.feed("stdout", "é".encode()[:1])
    digest.finish()
    assert digest.text() == "a\ufffdb\ufffd"


@pytest.mark.parametrize("chunk", [1, 7, 1000, 100_000])
def test_long_output_keeps_whole_lines_of_head_and_tail_and_counts_the_rest(chunk: int) -> None:
    """Past the limit the middle is left out, cut between lines; the count is right."""
    text = "".join(f"{i:06d}\n" for i in range(20_000))  # 140 000 characters
    digest = OutputDigest(1000)
    data = text.encode()
    for offset in range(0, len(data), chunk):
        digest.feed("stdout", data[offset : offset + chunk])
    digest.finish()
    shown = digest.text()
    head, _, tail = shown.partition("[... ")
    tail = tail.split("]\n", 1)[1]
    assert head == text[: 71 * 7]  # the whole lines within the first 500 characters
    assert tail == text[-71 * 7 :]
    assert f"{len(text) - 2 * 71 * 7} of {len(text)} characters left out" in shown
    assert digest.cut is True


def test_a_cut_inside_one_huge_line_keeps_the_limit() -> None:
    """Output without newlines is cut where it must be: head and tail are still half the limit each."""
    digest = OutputDigest(1000)
    digest.feed("stdout", b"x" * 5000)
    digest.finish()
    head, _, rest = digest.text().partition("\n[... ")
    assert head == "x" * 500
    assert rest.split("]\n", 1)[1] == "x" * 500


def test_stderr_lines_are_marked_and_lines_stay_whole() -> None:
    """Every stderr line starts with [stderr]; a line is never split by the other stream's output."""
    digest = OutputDigest(1000)
    digest.feed("stdout", b"abc")
    digest.feed("stderr", b"warning: one\nwarn")
    digest.feed("stdout", b"def\n")
    digest.feed("stderr", b"ing: two\n\n")
    digest.finish()
    assert digest.text() == "[stderr] warning: one\nabcdef\n[stderr] warning: two\n[stderr] \n"


def test_unfinished_last_lines_are_shown_apart() -> None:
    """Lines without a final newline still come out, each on a line of its own."""
    digest = OutputDigest(1000)
    digest.feed("stdout", b"prompt> ")
    digest.feed("stderr", b"fatal")
    digest.finish()
    assert digest.text() == "prompt> \n[stderr] fatal"


def test_a_line_longer_than_the_hold_back_is_passed_on_in_pieces() -> None:
    """A line without end (a progress bar) is not held back forever: memory stays bounded."""
    digest = OutputDigest(100_000)
    digest.feed("stderr", b"=" * (PARTIAL_LINE_CHARS + 10))
    assert digest.text() == "[stderr] " + "=" * (PARTIAL_LINE_CHARS + 10)
    digest.feed("stderr", b"=\n")
    assert digest.text() == "[stderr] " + "=" * (PARTIAL_LINE_CHARS + 11) + "\n"


def test_output_at_the_limit_is_whole() -> None:
    """Exactly the limit is not cut."""
    digest = OutputDigest(1000)
    digest.feed("stdout", b"x" * 1000)
    digest.finish()
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
