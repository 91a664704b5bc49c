"""kvcache.hashing: stable, chained block hashes and the config both sides must agree on."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np
import pytest

from kvcache.hashing import BlockHashConfig, hash_block, hash_blocks

BS4 = BlockHashConfig(block_size=4, seed=0)


def test_pinned_values_never_change():
    # Computed once and pinned: a change here breaks every deployed router/worker pair.
    assert hash_block(None, [1, 2, 3, 4], 0) == 8246461715927939963
    assert hash_block(None, [1, 2, 3, 4], 7) == 9549426183690656744
    assert hash_blocks(list(range(9)), BS4) == [15079925956901144435, 210418914408240638]
    assert hash_blocks([1, 2, 3, 4], BlockHashConfig(block_size=2)) == [
        6882224269094919500, 17712061550091983094]


def test_matches_the_documented_formula():
    def by_hand(seed: int, parent: int, tokens: list[int]) -> int:
        data = struct.pack("<QQ", seed, parent) + struct.pack(f"<{len(tokens)}I", *tokens)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    tokens = [5, 2**32 - 1, 0, 77, 123456, 9, 9, 9]
    h0 = by_hand(3, 0, tokens[:4])
    h1 = by_hand(3, h0, tokens[4:])
    assert hash_blocks(tokens, BlockHashConfig(block_size=4, seed=3)) == [h0, h1]
    assert hash_block(None, tokens[:4], 3) == h0
    assert hash_block(h0, tokens[4:], 3) == h1


def test_chaining_and_parent_argument():
    tokens = list(range(100, 112))
    h = hash_blocks(tokens, BS4)
    assert len(h) == 3
    assert h[0] == hash_block(None, tokens[0:4])
    assert h[1] == hash_block(h[0], tokens[4:8])
    assert h[2] == hash_block(h[1], tokens[8:12])
    # continuing a chain from a known parent gives the same tail
    assert hash_blocks(tokens[4:], BS4, parent=h[0]) == h[1:]
    # the first block's parent is 0
    assert hash_block(None, tokens[:4]) == hash_block(0, tokens[:4])
    # same tokens at a different place in the chain hash differently
    assert hash_block(h[0], tokens[:4]) != h[0]


def test_partial_block_skipped():
    full = hash_blocks(list(range(8)), BS4)
    assert hash_blocks(list(range(7)), BS4) == full[:1]
    assert hash_blocks(list(range(11)), BS4) == full
    assert hash_blocks(list(range(3)), BS4) == []
    assert hash_blocks([], BS4) == []


def test_prefix_sharing_and_divergence():
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    b = a[:8] + [0, 0, 0, 0]
    c = [1, 2, 3, 99] + a[4:]
    ha, hb, hc = (hash_blocks(x, BS4) for x in (a, b, c))
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    # a change in block 0 changes every later hash (chaining)
    assert all(x != y for x, y in zip(ha, hc))


def test_input_types_agree():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = hash_blocks(tokens, BS4)
    assert hash_blocks(tuple(tokens), BS4) == expected
    assert hash_blocks(np.array(tokens, dtype=np.int64), BS4) == expected
    assert hash_block(None, tuple(tokens[:4])) == expected[0]


def test_seed_and_block_size_change_hashes():
    tokens = list(range(16))
    base = hash_blocks(tokens, BlockHashConfig(block_size=4, seed=0))
    other_seed = hash_blocks(tokens, BlockHashConfig(block_size=4, seed=1))
    assert not set(base) & set(other_seed)
    other_size = hash_blocks(tokens, BlockHashConfig(block_size=8, seed=0))
    assert len(other_size) == 2 and not set(base) & set(other_size)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "16", None])
def test_config_rejects_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        BlockHashConfig(block_size=bad)


@pytest.mark.parametrize("bad", [-1, 2**64, 0.5, "0"])
def test_config_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match=r"hash seed must be an integer in \[0, 2\*\*64\)"):
        BlockHashConfig(seed=bad)


def test_config_defaults_limits_and_frozen():
    cfg = BlockHashConfig()
    assert (cfg.block_size, cfg.seed) == (16, 0)
    assert BlockHashConfig(seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 32  # type: ignore[misc]


def test_check_compatible_messages():
    router = BlockHashConfig(block_size=16, seed=0)
    router.check_compatible(BlockHashConfig(block_size=16, seed=0))
    with pytest.raises(ValueError) as e:
        router.check_compatible(BlockHashConfig(block_size=32, seed=0), who="worker w3")
    assert str(e.value) == (
        "worker w3 uses block_size=32 but this router uses block_size=16; "
        "start both with the same --block-size")
    with pytest.raises(ValueError) as e:
        router.check_compatible(BlockHashConfig(block_size=16, seed=5))
    assert str(e.value) == (
        "worker uses hash seed 5 but this router uses 0; start both with the same --hash-seed")
