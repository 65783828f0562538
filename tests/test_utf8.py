"""The UTF-8 splitter is lossless for any input cut at any point."""

from __future__ import annotations

import base64
import random

import pytest

from session_proxy.utf8 import BINARY_RUNS, Utf8Splitter


def reassemble(chunks: list[bytes]) -> tuple[bytes, list[tuple[str, str]]]:
    splitter = Utf8Splitter()
    pieces = [piece for chunk in chunks for piece in splitter.feed(chunk)] + splitter.flush()
    data = b"".join(base64.b64decode(text) if kind == "data_b64" else text.encode() for kind, text in pieces)
    return data, pieces


@pytest.mark.parametrize("text", ["héllo", "€uro", "😀 emoji", "mixed ascii и кириллица 中文"])
def test_every_cut_keeps_text_as_text(text: str) -> None:
    """Cutting valid UTF-8 anywhere never produces base64 or mangled characters."""
    raw = text.encode()
    for cut in range(len(raw) + 1):
        data, pieces = reassemble([raw[:cut], raw[cut:]])
        assert data == raw
        assert all(kind == "data" for kind, _ in pieces)


def test_one_byte_at_a_time() -> None:
    """Even byte-by-byte delivery rebuilds the exact text."""
    raw = "a€😀b".encode()
    data, pieces = reassemble([bytes([b]) for b in raw])
    assert data == raw
    assert "".join(text for _, text in pieces) == "a€😀b"


def test_invalid_bytes_travel_as_base64() -> None:
    """Invalid bytes go in data_b64; the valid text before them stays text."""
    data, pieces = reassemble([b"ok \xff\xfe end"])
    assert data == b"ok \xff\xfe end"
    assert pieces[0] == ("data", "ok ")
    assert pieces[1][0] == "data_b64"


def test_truncated_character_at_end_is_flushed() -> None:
    """A stream that ends inside a character loses nothing: the bytes come out as base64."""
    data, pieces = reassemble([b"x\xe2\x82"])
    assert data == b"x\xe2\x82"
    assert pieces[-1] == ("data_b64", base64.b64encode(b"\xe2\x82").decode())


def test_random_bytes_random_cuts_are_lossless() -> None:
    """Random binary and mixed input, cut at random points, comes back byte for byte."""
    rng = random.Random(1234)
    for _ in range(300):
        parts = [rng.randbytes(rng.randint(0, 40)), "€😀é".encode() * rng.randint(0, 3)]
        raw = b"".join(rng.sample(parts, len(parts)))
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, rng.randint(0, 6))))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert reassemble(chunks)[0] == raw


def test_invalid_byte_keeps_the_rest_of_its_chunk_as_text() -> None:
    """One invalid byte travels alone as base64: the valid text after it in the chunk stays text."""
    text = "and the rest of the line, which is valid UTF-8 café €"
    data, pieces = reassemble([b"caf\xe9 " + text.encode()])
    assert data == b"caf\xe9 " + text.encode()
    assert pieces == [("data", "caf"), ("data_b64", base64.b64encode(b"\xe9").decode()), ("data", " " + text)]


def test_encoded_surrogates_are_bytes_not_text() -> None:
    """UTF-8 that encodes a surrogate is invalid: it travels as base64, never as text."""
    data, pieces = reassemble([b"a\xed\xa0\x80b"])
    assert data == b"a\xed\xa0\x80b"
    assert pieces == [("data", "a"), ("data_b64", base64.b64encode(b"\xed\xa0\x80").decode()), ("data", "b")]


def test_a_mostly_binary_chunk_is_one_base64_piece() -> None:
    """Random bytes (an invalid byte every few) go as one piece per chunk, not an event per run;
    a chunk with a few invalid bytes still keeps its text as text."""
    raw = random.Random(7).randbytes(64 * 1024)
    data, pieces = reassemble([raw])
    assert data == raw
    assert [kind for kind, _ in pieces] == ["data_b64"]
    few = b"ok \xff " * BINARY_RUNS
    data, pieces = reassemble([few])
    assert data == few
    assert sum(kind == "data" for kind, _ in pieces) == BINARY_RUNS + 1  # around each invalid byte


def test_binary_and_text_mixed_in_large_chunks_are_lossless() -> None:
    """Chunks large enough to be taken as binary, cut inside characters and between text and
    random bytes, come back byte for byte (held-back bytes go with a binary chunk)."""
    rng = random.Random(99)
    for _ in range(60):
        parts = [rng.randbytes(rng.randint(0, 9000)), "€😀é text ".encode() * rng.randint(0, 900)]
        raw = b"".join(rng.sample(parts, len(parts))) * 2
        cuts = sorted(rng.sample(range(len(raw) + 1), min(len(raw) + 1, rng.randint(0, 8))))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert reassemble(chunks)[0] == raw
