"""kvcache.holds through the manager: pins for KV handles, reservations for KV imports; exact
block ids, events and integrity after every operation."""

from __future__ import annotations

import pytest

from kvcache.events import BlockStored
from kvcache.hashing import BlockHashConfig, hash_blocks
from kvcache.holds import PinnedBlocks
from kvcache.manager import ComputedPrefix, KVCacheManager

CFG = BlockHashConfig(block_size=4, seed=0)


def admit(m: KVCacheManager, rid: str, tokens: list[int]):
    prefix = m.get_computed_prefix(rid, tokens)
    table = m.allocate_slots(rid, tokens, len(tokens) - prefix.num_tokens, prefix)
    m.check_integrity()
    return prefix, table


def test_pin_keeps_the_full_prompt_blocks_in_use_until_released():
    m = KVCacheManager(8, CFG)
    p = list(range(10))  # two full blocks and a partial one
    admit(m, "a", p)
    pin = m.pin_prompt("a", p)
    h = hash_blocks(p, CFG)
    assert pin == PinnedBlocks("a#0", (0, 1), (h[0], h[1]), 8)
    m.free("a")
    m.check_integrity()
    assert (m.pool.ref_count(0), m.pool.ref_count(1), m.pool.ref_count(2)) == (1, 1, 0)
    assert m.num_used_blocks == 2 and m.pool.cached_block_ids() == []
    # pinned blocks are never evicted: a pool-filling allocation cannot take them
    assert m.pool.allocate(7) is None
    assert m.holds.release("a#0") is True
    assert m.holds.release("a#0") is False
    m.check_integrity()
    assert m.num_used_blocks == 0 and m.pool.cached_block_ids() == [1, 0]  # tail first


def test_pin_of_a_short_prompt_or_without_caching_pins_nothing():
    m = KVCacheManager(8, CFG)
    admit(m, "a", [1, 2, 3])
    assert m.pin_prompt("a", [1, 2, 3]) == PinnedBlocks("a#0", (), (), 0)
    off = KVCacheManager(8, CFG, enable_prefix_caching=False)
    admit(off, "b", list(range(9)))
    assert off.pin_prompt("b", list(range(9))).block_ids == ()
    with pytest.raises(KeyError, match="holds no KV blocks"):
        m.pin_prompt("nobody", [1, 2, 3, 4])


def test_a_pin_takes_the_block_that_holds_the_hash_when_the_request_has_a_duplicate():
    m = KVCacheManager(8, CFG)
    p = list(range(8))
    admit(m, "a", p)  # blocks 0, 1 hold the hashes
    m.drain_events(0.0)
    # "b" computes the same tokens without a prefix hit (e.g. admitted in the same step)
    m.allocate_slots("b", p, 8, ComputedPrefix())
    assert m.block_table("b") == (2, 3)
    pin = m.pin_prompt("b", p)
    assert pin.block_ids == (0, 1)  # the lookup's blocks, not b's unhashed copies
    m.free("b")
    m.free("a")
    m.check_integrity()
    assert m.holds.blocks(pin.hold_id) == (0, 1)
    m.holds.release(pin.hold_id)
    m.check_integrity()


def test_reserve_commit_puts_imported_blocks_into_the_prefix_cache_with_events():
    m = KVCacheManager(8, CFG)
    p = list(range(12))
    h = hash_blocks(p, CFG)
    hold, ids = m.holds.reserve("imp", 3)
    assert (hold, ids) == ("imp#0", (0, 1, 2))
    m.check_integrity()
    assert m.cached_prefix_blocks(h) == 0
    assert m.holds.commit(hold, h, None) == 3
    m.check_integrity()
    assert m.cached_prefix_blocks(h) == 3
    assert m.pool.cached_block_ids() == [2, 1, 0]
    assert m.drain_events(1.0).events == (BlockStored(tuple(h), None),)
    # the next request with this prompt computes only its last token... of a longer prompt
    prefix, table = admit(m, "next", p + [99])
    assert prefix == ComputedPrefix((0, 1, 2), 12) and table == (0, 1, 2, 3)


def test_commit_of_a_suffix_chains_on_the_parent_and_keeps_existing_blocks():
    m = KVCacheManager(8, CFG)
    p = list(range(12))
    h = hash_blocks(p, CFG)
    admit(m, "a", p[:8] + [0])  # blocks 0, 1 hold h[0], h[1]
    m.free("a")
    m.drain_events(0.0)
    k = m.cached_prefix_blocks(h)
    assert k == 2
    hold, ids = m.holds.reserve("imp", 2)  # h[1] again (already held) and h[2]
    assert ids == (3, 4)
    assert m.holds.commit(hold, h[1:], h[0]) == 1
    m.check_integrity()
    assert m.pool.lookup(h[1]) == 1 and m.pool.lookup(h[2]) == 4
    assert m.pool.block_hash(3) is None and 3 in m.pool._free
    assert m.drain_events(1.0).events == (BlockStored((h[2],), h[1]),)


def test_reserve_refuses_without_side_effects_and_release_returns_blocks_to_free():
    m = KVCacheManager(4, CFG)
    assert m.holds.reserve("imp", 5) is None
    assert m.num_used_blocks == 0 and len(m.holds) == 0
    hold, _ = m.holds.reserve("imp", 4)
    assert m.num_free_blocks == 0
    with pytest.raises(ValueError, match="one hash per reserved block"):
        m.holds.commit(hold, [1, 2], None)
    assert m.holds.release(hold)
    m.check_integrity()
    assert m.num_free_blocks == 4 and m.pool.cached_block_ids() == []
    assert m.drain_events(0.0) is None
    with pytest.raises(KeyError, match="never made, or released"):
        m.holds.blocks(hold)


def test_integrity_counts_holds():
    m = KVCacheManager(4, CFG)
    hold, _ = m.holds.reserve("imp", 2)
    m.check_integrity()
    m.holds._holds.pop(hold)  # a hold forgotten without releasing: refs leak
    with pytest.raises(AssertionError, match=r"request\(s\) and hold\(s\) hold it"):
        m.check_integrity()
