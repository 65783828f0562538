"""The wrapper's markers are stripped byte-exactly wherever reads cut them; nothing else is lost."""

from __future__ import annotations

from session_proxy.backends.kubernetes.wrapper import (
    LINE_VALUE_LIMIT,
    ExitReport,
    Marker,
    MarkerFilter,
    encode_header,
)

NONCE = "ab" * 16


def run(chunks: list[bytes]) -> tuple[bytes, list[Marker]]:
    marker_filter = MarkerFilter(NONCE)
    output, markers = b"", []
    for chunk in chunks:
        clean, found = marker_filter.feed(chunk)
        output += clean
        markers += found
    return output + marker_filter.flush(), markers


def test_marker_cut_at_every_position() -> None:
    """Output around a marker survives and the marker is recognised, however the stream is cut."""
    stream = b"before\x1e" + f"\x1eSP{NONCE}:exit:7\x1e".encode() + b"after"
    for cut in range(len(stream) + 1):
        output, markers = run([stream[:cut], stream[cut:]])
        assert output == b"before\x1eafter", cut
        assert markers == [Marker("exit", "7")], cut


def test_foreign_nonce_is_output() -> None:
    """A marker with another nonce is the command's output, kept verbatim."""
    forged = f"\x1eSP{'cd' * 16}:exit:0\x1e".encode()
    assert run([forged]) == (forged, [])


def test_held_bytes_come_back_on_flush() -> None:
    """Bytes held back as a possible marker start are returned when the stream ends."""
    assert run([b"tail\x1eSP" + NONCE[:5].encode()]) == (b"tail\x1eSP" + NONCE[:5].encode(), [])


def test_header_carries_values_as_lines_or_length_prefixed() -> None:
    """A short value without a newline is one `=` line; one with a newline, or a long one, is
    length-prefixed raw bytes, so the script takes it with one read; the header ends with `.`."""
    long = "y" * (LINE_VALUE_LIMIT + 1)
    header = encode_header(nonce=NONCE, argv=["a b", "\udcff", "$(x)\n'", long], workdir="/w",
                           env={"K": "v"}, stdin_length=3, deadline=10, grace=2)  # fmt: skip
    assert header == b"".join([
        b"SP2\n", NONCE.encode(), b"\n10\n2\n1\n3\n=/w\n1\n=K=v\n4\n=a b\n=\xff\n:6\n$(x)\n'",
        b":%d\n" % len(long), long.encode(), b".\n",
    ])  # fmt: skip


def test_exit_report_says_whether_the_group_was_empty() -> None:
    """`exit:STATUS` leaves the drain on; `exit:STATUS:empty` says nothing is left to write;
    anything else is no exit report at all."""
    assert ExitReport.parse("0") == ExitReport(0, group_empty=False)
    assert ExitReport.parse("143:empty") == ExitReport(143, group_empty=True)
    for bad in ("", "x", "1:full", "-1", "1:empty:x"):
        assert ExitReport.parse(bad) is None, bad
