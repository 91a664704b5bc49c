"""router.trace: Mooncake lines to deterministic token ids that keep the prefix structure."""

from __future__ import annotations

import hashlib
import struct

import pytest

from kvcache.hashing import BlockHashConfig, hash_blocks
from router.trace import (
    TRACE_SALT,
    TraceRequest,
    hash_id_tokens,
    parse_trace_line,
    request_token_ids,
    trace_token_ids,
)


def test_tokens_follow_the_documented_formula():
    h, vocab, first = 12345, 1000, 3
    digest = hashlib.blake2b(TRACE_SALT + h.to_bytes(8, "little") + (0).to_bytes(4, "little"),
                             digest_size=64).digest()
    expected = [first + d % (vocab - first) for d in struct.unpack("<16I", digest)]
    toks = hash_id_tokens(h, vocab, first)
    assert len(toks) == 512 and list(toks[:16]) == expected
    assert all(first <= t < vocab for t in toks)
    assert hash_id_tokens(h, vocab, first) == toks  # deterministic
    assert hash_id_tokens(h + 1, vocab, first) != toks


def test_prompts_share_exactly_their_common_ids():
    a = request_token_ids([5, 6, 7], 1300, vocab_size=32000)
    b = request_token_ids([5, 6, 9, 10], 2000, vocab_size=32000)
    assert (len(a), len(b)) == (1300, 2000)
    assert a[:1024] == b[:1024] and a[1024:1300] != b[1024:1300]
    assert a[:512] == list(hash_id_tokens(5, 32000))
    ha = hash_blocks(a, BlockHashConfig(64, 0))
    hb = hash_blocks(b, BlockHashConfig(64, 0))
    shared = next(i for i, (x, y) in enumerate(zip(ha, hb, strict=False)) if x != y)
    assert (len(ha), len(hb), shared) == (20, 31, 16)  # 1024 tokens = 16 blocks of 64


def test_parse_line():
    r = parse_trace_line('{"timestamp": 40, "input_length": 600, "output_length": 3, '
                         '"hash_ids": [1, 2]}')
    assert r == TraceRequest(40.0, 600, 3, (1, 2))
    assert len(trace_token_ids(r, 500)) == 600


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"timestamp": 0, "input_length": 10}', "not a Mooncake trace line"),
        ("not json", "not a Mooncake trace line"),
        ('{"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]}',
         "2 hash ids cover 1024 tokens, fewer than input_length=1025"),
        ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}',
         "input_length >= 1"),
    ],
)
def test_bad_lines(line, message):
    with pytest.raises(ValueError, match=message):
        parse_trace_line(line)


def test_bad_arguments():
    with pytest.raises(ValueError, match="first_token < vocab_size"):
        hash_id_tokens(1, 10, 10)
    with pytest.raises(ValueError, match="exceeds the 512 tokens"):
        request_token_ids([1], 513, 100)
