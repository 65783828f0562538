"""The wrapper's markers are stripped byte-exactly wherever reads cut them; nothing else is lost."""

from __future__ import annotations

from session_proxy.backends.kubernetes.wrapper import Marker, MarkerFilter, encode_header, escape

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


def test_header_escapes_every_byte() -> None:
    """Header values are plain ASCII escapes, whatever they hold: the script never evaluates them."""
    assert escape(b"$(x)\n'") == "\\0044\\0050\\0170\\0051\\0012\\0047"
    header = encode_header(nonce=NONCE, argv=["a b", "\udcff"], workdir="/w", env={"K": "v"},
                           stdin_length=3, deadline=10, grace=2)  # fmt: skip
    assert header.isascii()
    assert header.decode().splitlines() == [
        "SP1", NONCE, "10", "2", "3", escape(b"/w"),
        "1", escape(b"K=v"), "2", escape(b"a b"), escape(b"\xff"),
    ]  # fmt: skip
