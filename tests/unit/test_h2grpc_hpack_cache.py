"""BlockDecoder: the same headers as a plain hpack.Decoder, block after block, while it keeps
only the blocks that left the dynamic table unchanged."""

from __future__ import annotations

import random

import hpack
import pytest

from ferry.rpc import frames as fr
from ferry.rpc.hpack_cache import MAX_KEPT, BlockDecoder


def _call(path: str, timeout: str | None, key: str) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", "127.0.0.1:1"), ("content-type", "application/grpc"),
               ("te", "trailers"), ("k", key)]
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    return headers


def test_same_headers_as_a_plain_decoder_with_an_indexing_encoder():
    rng = random.Random(7)
    enc = hpack.Encoder()
    plain, cached = hpack.Decoder(), BlockDecoder(65536)
    for i in range(400):
        if i in (100, 250):
            enc.header_table_size = 256 if i == 100 else 4096  # size updates in the stream
        want = _call(rng.choice(["/a.S/X", "/a.S/Y"]),
                     rng.choice([None, None, f"{rng.randint(1, 99)}m"]),
                     rng.choice(["v1", "v2", "v3"]))
        block = enc.encode(want)
        assert cached.decode(block) == plain.decode(block) == want


def test_a_block_that_changes_the_table_is_not_kept_and_empties_what_was():
    dec = BlockDecoder(65536)
    stateless = fr.literal(b":path", b"/a.S/X") + b"\x83"  # literals, static index only
    assert dec.decode(stateless) == [(":path", "/a.S/X"), (":method", "POST")]
    assert dec._kept == {stateless: [(":path", "/a.S/X"), (":method", "POST")]}
    adds = b"\x40" + bytes([1]) + b"k" + bytes([1]) + b"v"  # literal with incremental indexing
    assert dec.decode(adds) == [("k", "v")]
    assert dec._kept == {}
    indexed = b"\xbe"  # dynamic entry 62: ("k", "v"), valid only while the table holds it
    assert dec.decode(indexed) == [("k", "v")]
    assert indexed in dec._kept
    dec.decode(b"\x40" + bytes([1]) + b"n" + bytes([1]) + b"w")  # now 62 is ("n", "w")
    assert dec._kept == {}
    assert dec.decode(indexed) == [("n", "w")]


def test_at_most_max_kept_blocks():
    dec = BlockDecoder(65536)
    for i in range(MAX_KEPT + 10):
        dec.decode(fr.literal(b"x-n", str(i).encode()))
    assert len(dec._kept) == MAX_KEPT


def test_errors_are_raised_and_not_kept():
    dec = BlockDecoder(100)
    too_big = fr.literal(b"x-big", b"v" * 200)
    for _ in range(2):
        with pytest.raises(hpack.HPACKError):
            dec.decode(too_big)
    assert dec._kept == {}
    with pytest.raises(hpack.HPACKError):
        dec.decode(b"\xff\xff\xff\xff\xff")  # index far beyond any table
