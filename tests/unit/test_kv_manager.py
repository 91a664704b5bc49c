"""kvcache.manager: prefix hits, block tables, refusal without side effects, events."""

from __future__ import annotations

import pytest

import kvcache.manager as manager_mod
from kvcache.events import BlockRemoved, BlockStored
from kvcache.hashing import BlockHashConfig, hash_blocks
from kvcache.manager import ComputedPrefix, KVCacheManager, PrefixCacheStats

CFG = BlockHashConfig(block_size=4, seed=0)


def hashes(tokens) -> list[int]:
    return hash_blocks(list(tokens), CFG)


def make(num_blocks: int = 8, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, CFG, enable_prefix_caching=caching)


def admit(m: KVCacheManager, rid: str, tokens: list[int], num_new: int | None = None):
    """What the scheduler does for a waiting request: look up the prefix, then allocate."""
    prefix = m.get_computed_prefix(rid, tokens)
    n = len(tokens) - prefix.num_tokens if num_new is None else num_new
    table = m.allocate_slots(rid, tokens, n, prefix)
    m.check_integrity()
    return prefix, table


def test_first_allocation_registers_full_blocks():
    m = make()
    p = list(range(10))
    prefix, table = admit(m, "a", p)
    assert prefix == ComputedPrefix((), 0)
    assert table == (0, 1, 2)
    h = hashes(p)
    assert [m.pool.block_hash(b) for b in table] == [h[0], h[1], None]
    assert m.num_computed_tokens("a") == 10 and m.block_table("a") == (0, 1, 2)
    assert (m.num_used_blocks, m.num_free_blocks, m.usage) == (3, 5, 3 / 8)
    batch = m.drain_events(1.0)
    assert (batch.seq, batch.events) == (0, (BlockStored((h[0], h[1]), None),))


def test_prefix_hit_after_free():
    m = make()
    a = list(range(10))
    admit(m, "a", a)
    m.free("a")  # releases 2, 1, 0: block 2 (partial) is free, 1 and 0 cached
    m.check_integrity()
    assert not m.has_request("a")
    assert m.pool.cached_block_ids() == [1, 0]
    b = a[:8] + [50, 51, 52]
    prefix, table = admit(m, "b", b)
    assert prefix == ComputedPrefix((0, 1), 8)
    assert table == (0, 1, 3)  # free queue: 3, 4, ..., 7, then the freed 2
    assert m.num_computed_tokens("b") == 11
    assert m.prefix_stats() == PrefixCacheStats(num_requests=2, queried_tokens=21,
                                                hit_tokens=8)
    assert m.prefix_stats().hit_rate == pytest.approx(8 / 21)


def test_prefix_lookup_is_pure():
    m = make()
    admit(m, "a", list(range(8)))
    m.free("a")
    before = (m.pool.cached_block_ids(), m.num_free_blocks, m.num_used_blocks)
    assert m.get_computed_prefix("b", list(range(9))) == ComputedPrefix((0, 1), 8)
    assert m.get_computed_prefix("b", list(range(9))) == ComputedPrefix((0, 1), 8)
    assert (m.pool.cached_block_ids(), m.num_free_blocks, m.num_used_blocks) == before
    assert not m.has_request("b")
    m.check_integrity()


def test_never_the_whole_sequence():
    m = make()
    admit(m, "a", list(range(12)))
    m.free("a")
    # 12 tokens = 3 full cached blocks: the last one is dropped so one token is computed
    assert m.get_computed_prefix("b", list(range(12))) == ComputedPrefix((0, 1), 8)
    assert m.get_computed_prefix("c", list(range(8))) == ComputedPrefix((0,), 4)
    assert m.get_computed_prefix("d", list(range(13))) == ComputedPrefix((0, 1, 2), 12)
    assert m.get_computed_prefix("e", list(range(4))) == ComputedPrefix((), 0)
    # recomputing the dropped block: the new copy stays unhashed (block 2 keeps the hash)
    prefix, table = admit(m, "b", list(range(12)))
    assert prefix == ComputedPrefix((0, 1), 8)
    assert table == (0, 1, 3)
    assert m.pool.block_hash(3) is None and m.pool.block_hash(2) == hashes(range(12))[2]
    m.drain_events(0.0)
    m.free("b")
    assert m.drain_events(0.0) is None
    assert m.pool.cached_block_ids() == [2, 1, 0]
    m.check_integrity()


def test_refusal_changes_nothing_even_with_a_cached_prefix():
    m = make(num_blocks=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    admit(m, "a", a)
    m.free("a")  # cached LRU: [1, 0]
    _, table_c = admit(m, "c", [9] * 8)
    assert table_c == (2, 3)
    m.drain_events(0.0)
    b = a[:4] + [0, 0, 0, 0, 0]  # shares block 0 with a; needs 3 blocks, 2 new
    prefix = m.get_computed_prefix("b", b)
    assert prefix == ComputedPrefix((0,), 4)
    # 2 blocks are allocatable, but taking the prefix removes block 0 from them
    assert m.num_free_blocks == 2
    assert m.allocate_slots("b", b, 5, prefix) is None
    assert not m.has_request("b")
    assert m.pool.ref_count(0) == 0 and m.pool.cached_block_ids() == [1, 0]
    assert (m.num_free_blocks, m.num_used_blocks) == (2, 2)
    assert m.drain_events(0.0) is None
    assert m.prefix_stats().num_requests == 2
    m.check_integrity()
    m.free("c")  # cached LRU: [1, 0, 3, 2]
    prefix = m.get_computed_prefix("b", b)
    assert m.allocate_slots("b", b, 5, prefix) == (0, 1, 3)
    hc = hashes([9] * 8)
    ha = hashes(a)
    hb = hashes(b)
    assert m.drain_events(1.0).events == (
        BlockRemoved((ha[1], hc[1])),
        BlockStored((hb[1],), hb[0]),
    )
    m.check_integrity()


def test_refusal_without_prefix_and_retry():
    m = make(num_blocks=3)
    admit(m, "a", list(range(8)))
    assert m.allocate_slots("b", list(range(100, 109)), 9) is None
    assert not m.has_request("b") and m.num_used_blocks == 2
    m.free("a")
    assert m.allocate_slots("b", list(range(100, 109)), 9) == (2, 1, 0)
    m.check_integrity()


def test_decode_growth_across_a_block_boundary():
    m = make()
    tokens = list(range(20, 27))  # 7 prompt tokens
    _, table = admit(m, "a", tokens)
    assert table == (0, 1)
    m.drain_events(0.0)
    tokens.append(90)  # first output: the 8th token fills block 1
    assert m.allocate_slots("a", tokens, 1) == (0, 1)
    h = hashes(tokens)
    assert m.pool.block_hash(1) == h[1]
    assert m.drain_events(1.0).events == (BlockStored((h[1],), h[0]),)
    tokens.append(91)  # the 9th token needs a third block
    assert m.allocate_slots("a", tokens, 1) == (0, 1, 2)
    assert m.num_computed_tokens("a") == 9 and m.pool.block_hash(2) is None
    assert m.drain_events(2.0) is None
    m.check_integrity()


def test_chunked_prefill_registers_blocks_as_they_fill():
    m = make()
    p = list(range(30, 40))
    assert m.allocate_slots("a", p, 4) == (0,)
    assert m.allocate_slots("a", p, 3) == (0, 1)
    assert m.pool.block_hash(1) is None
    assert m.allocate_slots("a", p, 3) == (0, 1, 2)
    h = hashes(p)
    assert [m.pool.block_hash(b) for b in (0, 1, 2)] == [h[0], h[1], None]
    # stores of one chain within one step merge into one event
    assert m.drain_events(0.0).events == (BlockStored((h[0], h[1]), None),)
    m.check_integrity()


def test_two_requests_share_prefix_blocks():
    m = make()
    a = list(range(12))
    admit(m, "a", a)
    b = a[:8] + [7, 7, 7]
    prefix, table = admit(m, "b", b)
    assert prefix == ComputedPrefix((0, 1), 8)
    assert table == (0, 1, 3)
    assert [m.pool.ref_count(x) for x in range(4)] == [2, 2, 1, 1]
    assert m.num_used_blocks == 4
    m.free("a")
    assert [m.pool.ref_count(x) for x in range(4)] == [1, 1, 0, 1]
    assert m.pool.cached_block_ids() == [2]
    m.check_integrity()
    m.free("b")
    assert m.pool.cached_block_ids() == [2, 1, 0]  # b's tail 3 is partial: free
    m.check_integrity()


def test_same_prefix_computed_twice_in_one_step_keeps_one_copy():
    m = make()
    p = list(range(9))
    pa = m.get_computed_prefix("a", p)
    pb = m.get_computed_prefix("b", p)  # before a registered anything: a miss
    assert m.allocate_slots("a", p, 9, pa) == (0, 1, 2)
    assert m.allocate_slots("b", p, 9, pb) == (3, 4, 5)
    assert [m.pool.block_hash(x) for x in (3, 4)] == [None, None]
    h = hashes(p)
    assert m.drain_events(0.0).events == (BlockStored((h[0], h[1]), None),)
    m.free("b")
    assert m.pool.cached_block_ids() == [] and m.num_free_blocks == 5
    m.check_integrity()


def test_tail_blocks_are_evicted_first():
    m = make(num_blocks=4)
    admit(m, "a", list(range(13)))  # 4 blocks, 3 full
    m.free("a")
    assert m.pool.cached_block_ids() == [2, 1, 0]
    admit(m, "x", [500] * 5)  # needs 2: the free block 3, then evicts block 2
    assert m.block_table("x") == (3, 2)
    assert m.get_computed_prefix("a2", list(range(13))) == ComputedPrefix((0, 1), 8)


def test_hashes_each_token_once(monkeypatch):
    hashed: list[int] = []
    real = manager_mod.hash_blocks

    def counting(token_ids, config, parent=None):
        hashed.append(len(token_ids))
        return real(token_ids, config, parent)

    monkeypatch.setattr(manager_mod, "hash_blocks", counting)
    m = make(num_blocks=16)
    tokens = list(range(10))
    m.get_computed_prefix("a", tokens)
    m.get_computed_prefix("a", tokens)
    m.allocate_slots("a", tokens, 10, m.get_computed_prefix("a", tokens))
    for t in range(30):
        tokens.append(1000 + t)
        m.allocate_slots("a", tokens, 1)
    assert m.num_computed_tokens("a") == 40
    assert sum(hashed) == 40  # 10 full blocks, every token hashed exactly once
    assert [m.pool.block_hash(b) for b in m.block_table("a")] == hashes(tokens)
    m.check_integrity()


def test_stale_prefix_is_refused():
    m = make(num_blocks=3)
    admit(m, "a", list(range(9)))
    m.free("a")  # LRU [1, 0], free [2]
    stale = m.get_computed_prefix("b", list(range(9)))
    assert stale == ComputedPrefix((0, 1), 8)
    admit(m, "c", [7] * 9)  # takes 2, then evicts 1 and 0
    m.free("c")
    with pytest.raises(ValueError, match="stale ComputedPrefix, block 0 no longer holds"):
        m.allocate_slots("b", list(range(9)), 1, stale)
    assert not m.has_request("b")
    m.check_integrity()


def test_caller_errors():
    m = make()
    p = list(range(10))
    with pytest.raises(ValueError, match="num_new_tokens must be an integer >= 1, got 0"):
        m.allocate_slots("a", p, 0)
    with pytest.raises(ValueError, match="0 tokens held \\+ 11 new = 11 but only 10"):
        m.allocate_slots("a", p, 11)
    with pytest.raises(ValueError, match="ComputedPrefix covers 1 blocks but claims 3 tokens"):
        m.allocate_slots("a", p, 1, ComputedPrefix((0,), 3))
    with pytest.raises(ValueError, match="has no tokens"):
        m.get_computed_prefix("a", [])
    with pytest.raises(KeyError, match="holds no KV blocks"):
        m.block_table("a")
    assert not m.has_request("a") and m.num_used_blocks == 0
    admit(m, "a", p)
    with pytest.raises(ValueError, match="pass `computed` only on its first"):
        m.allocate_slots("a", p + [1], 1, ComputedPrefix((0,), 4))
    with pytest.raises(ValueError, match="10 tokens held \\+ 1 new = 11 but only 10"):
        m.allocate_slots("a", p, 1)
    with pytest.raises(TypeError, match="hash_config must be a BlockHashConfig"):
        KVCacheManager(4, 16)  # type: ignore[arg-type]
    m.free("never-seen")  # freeing a request that holds nothing is a no-op
    m.check_integrity()


def test_prefix_caching_disabled():
    m = make(caching=False)
    p = list(range(10))
    admit(m, "a", p)
    m.free("a")
    prefix, table = admit(m, "b", p)
    assert prefix == ComputedPrefix((), 0)
    assert table == (3, 4, 5)
    assert m.drain_events(0.0) is None
    assert m.prefix_stats() == PrefixCacheStats(2, 20, 0)
    with pytest.raises(ValueError, match="prefix caching is disabled"):
        m.allocate_slots("c", p, 2, ComputedPrefix((0,), 4))


def test_reset_prefix_cache():
    m = make()
    admit(m, "a", list(range(9)))
    m.drain_events(0.0)
    assert m.reset_prefix_cache() is False
    m.free("a")
    assert m.reset_prefix_cache() is True
    assert m.get_computed_prefix("b", list(range(9))) == ComputedPrefix((), 0)
    assert m.drain_events(1.0).seq == 1
    m.check_integrity()


def test_check_integrity_catches_a_lost_reference():
    m = make()
    admit(m, "a", list(range(9)))
    m._reqs["a"].blocks.pop()
    m._reqs["a"].table = tuple(m._reqs["a"].blocks)
    with pytest.raises(AssertionError, match="request 'a' holds 2 blocks for 9 tokens"):
        m.check_integrity()


def test_check_integrity_catches_a_reference_taken_outside_the_manager():
    m = make()
    admit(m, "a", list(range(9)))
    m.pool.acquire([1])
    with pytest.raises(AssertionError, match=r"block 1 has ref 2 but 1 request\(s\) and hold\(s\) hold it"):
        m.check_integrity()
