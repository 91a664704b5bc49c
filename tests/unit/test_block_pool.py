"""kvcache.block_pool: exact block ids, LRU eviction order, KV events, integrity."""

from __future__ import annotations

import random

import pytest

from kvcache.block_pool import BlockPool, blocks_needed
from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch

# Arbitrary distinct "hashes"; the pool does not compute hashes itself.
H = [0xA000 + i for i in range(32)]


def state(pool: BlockPool) -> tuple[int, int, int]:
    """(free, cached, in use) after checking every invariant."""
    pool.check_integrity()
    assert pool.num_allocatable == pool.num_free + pool.num_cached
    return pool.num_free, pool.num_cached, pool.num_in_use


def cache_chain(pool: BlockPool, blocks: list[int], hashes: list[int], parent=None) -> None:
    for b, h in zip(blocks, hashes):
        assert pool.cache_block(b, h, parent) is True
        parent = h
    pool.check_integrity()


def test_fresh_pool_hands_out_lowest_ids_first():
    pool = BlockPool(6, 4)
    assert state(pool) == (6, 0, 0)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert state(pool) == (1, 0, 5)
    assert pool.usage == pytest.approx(5 / 6)
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]


def test_allocate_that_does_not_fit_changes_nothing():
    pool = BlockPool(4, 4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None
    assert state(pool) == (1, 0, 3)
    assert pool.allocate(0) == []
    assert pool.allocate(1) == [3]
    assert pool.allocate(1) is None
    assert state(pool) == (0, 0, 4)
    assert pool.drain_events(0.0) is None


def test_freed_unhashed_blocks_join_the_back_of_the_free_queue():
    pool = BlockPool(6, 4)
    assert pool.allocate(2) == [0, 1]
    pool.release([1, 0])
    assert state(pool) == (6, 0, 0)
    assert pool.allocate(6) == [2, 3, 4, 5, 1, 0]


def test_lru_eviction_tail_first_with_events():
    pool = BlockPool(4, 4)
    blocks = pool.allocate(4)
    assert blocks == [0, 1, 2, 3]
    cache_chain(pool, blocks, H[:4])
    pool.release(reversed(blocks))  # how a request frees: tail first
    assert state(pool) == (0, 4, 0)
    assert pool.cached_block_ids() == [3, 2, 1, 0]
    assert [pool.lookup(h) for h in H[:4]] == [0, 1, 2, 3]
    assert pool.allocate(2) == [3, 2]
    assert state(pool) == (0, 2, 2)
    assert pool.lookup(H[3]) is None and pool.lookup(H[2]) is None
    assert pool.lookup(H[1]) == 1
    assert pool.block_hash(3) is None and pool.block_hash(1) == H[1]
    assert pool.drain_events(5.0) == KvEventBatch(
        seq=0, timestamp=5.0,
        events=(BlockStored((H[0], H[1], H[2], H[3]), None), BlockRemoved((H[3], H[2]))))


def test_free_blocks_are_used_before_cached_ones():
    pool = BlockPool(4, 4)
    a = pool.allocate(2)
    cache_chain(pool, a, H[:2])
    pool.release([1, 0])
    assert state(pool) == (2, 2, 0)
    assert pool.allocate(3) == [2, 3, 1]
    assert state(pool) == (0, 1, 3)
    assert pool.lookup(H[0]) == 0 and pool.lookup(H[1]) is None
    pool.drain_events(0.0)
    assert pool.allocate(1) == [0]
    assert pool.drain_events(1.0).events == (BlockRemoved((H[0],)),)


def test_release_order_sets_eviction_order():
    pool = BlockPool(3, 4)
    blocks = pool.allocate(3)
    cache_chain(pool, blocks, H[:3])
    pool.release([1])
    pool.release([0, 2])
    assert pool.cached_block_ids() == [1, 0, 2]
    assert pool.allocate(1) == [1]
    assert pool.allocate(2) == [0, 2]
    assert state(pool) == (0, 0, 3)


def test_acquire_takes_a_cached_block_out_of_the_lru():
    pool = BlockPool(3, 4)
    blocks = pool.allocate(3)
    cache_chain(pool, blocks, H[:3])
    pool.release([2, 1, 0])
    pool.acquire([pool.lookup(H[0]), pool.lookup(H[1])])
    assert state(pool) == (0, 1, 2)
    assert pool.ref_count(0) == 1 and pool.ref_count(1) == 1
    assert pool.cached_block_ids() == [2]
    assert pool.allocate(2) is None  # 0 and 1 are no longer evictable
    assert pool.allocate(1) == [2]
    pool.release([1, 0])
    assert pool.cached_block_ids() == [1, 0]
    assert state(pool) == (0, 2, 1)


def test_shared_block_stays_in_use_until_last_release():
    pool = BlockPool(2, 4)
    (b,) = pool.allocate(1)
    pool.cache_block(b, H[0], None)
    pool.acquire([b])
    assert pool.ref_count(b) == 2
    pool.release([b])
    assert pool.ref_count(b) == 1 and state(pool) == (1, 0, 1)
    pool.release([b])
    assert state(pool) == (1, 1, 0)
    assert pool.lookup(H[0]) == b


def test_acquire_errors_change_nothing():
    pool = BlockPool(3, 4)
    assert pool.allocate(1) == [0]
    with pytest.raises(ValueError, match="cannot acquire block 2: it is free"):
        pool.acquire([0, 2])
    assert pool.ref_count(0) == 1
    with pytest.raises(ValueError, match=r"block id 3 is out of range \[0, 3\)"):
        pool.acquire([3])
    assert state(pool) == (2, 0, 1)


def test_release_of_unreferenced_block_is_a_bug():
    pool = BlockPool(3, 4)
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(ValueError, match=r"cannot release block 2 1 time\(s\): it has 0"):
        pool.release([0, 2])
    with pytest.raises(ValueError, match=r"cannot release block 0 2 time\(s\): it has 1"):
        pool.release([0, 0])
    assert [pool.ref_count(b) for b in range(3)] == [1, 1, 0]
    assert state(pool) == (1, 0, 2)


def test_duplicate_hash_keeps_the_existing_block():
    pool = BlockPool(3, 4)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, H[0], None) is True
    assert pool.cache_block(b, H[0], None) is False
    assert pool.block_hash(b) is None and pool.lookup(H[0]) == a
    assert pool.cache_block(a, H[0], None) is True  # same mapping again: no new event
    pool.release([b])
    assert state(pool) == (2, 0, 1)  # the duplicate went back to free, not to the cache
    assert pool.drain_events(0.0).events == (BlockStored((H[0],), None),)


def test_cache_block_errors():
    pool = BlockPool(2, 4)
    with pytest.raises(ValueError, match="cannot cache block 0: it is not in use"):
        pool.cache_block(0, H[0], None)
    (b,) = pool.allocate(1)
    pool.cache_block(b, H[0], None)
    with pytest.raises(ValueError, match="block 0 already holds hash"):
        pool.cache_block(b, H[1], None)
    assert pool.lookup(H[1]) is None and pool.lookup(H[0]) == 0
    state(pool)


def test_stored_events_merge_only_along_one_chain():
    pool = BlockPool(8, 4)
    blocks = pool.allocate(8)
    pool.cache_block(blocks[0], H[0], None)
    pool.cache_block(blocks[1], H[1], H[0])  # continues the chain: merged
    pool.cache_block(blocks[2], H[10], None)  # a new sequence: new event
    pool.cache_block(blocks[3], H[2], H[1])  # back to the first chain: new event
    pool.cache_block(blocks[4], H[3], H[2])  # merged into the previous one
    pool.cache_block(blocks[5], H[20], H[7])  # parent unknown to this batch: new event
    assert pool.drain_events(1.0).events == (
        BlockStored((H[0], H[1]), None),
        BlockStored((H[10],), None),
        BlockStored((H[2], H[3]), H[1]),
        BlockStored((H[20],), H[7]),
    )
    # a chain is not merged across a drain
    pool.cache_block(blocks[6], H[21], H[20])
    assert pool.drain_events(2.0).events == (BlockStored((H[21],), H[20]),)


def test_event_order_is_kept_across_store_evict_store():
    pool = BlockPool(2, 4)
    a = pool.allocate(2)
    cache_chain(pool, a, H[:2])
    pool.release([1, 0])
    assert pool.allocate(1) == [1]  # evicts H[1]
    pool.cache_block(1, H[5], H[0])
    assert pool.allocate(1) == [0]  # evicts H[0]
    assert pool.drain_events(0.0).events == (
        BlockStored((H[0], H[1]), None),
        BlockRemoved((H[1],)),
        BlockStored((H[5],), H[0]),
        BlockRemoved((H[0],)),
    )
    state(pool)


def test_drain_sequence_numbers_have_no_gaps():
    pool = BlockPool(4, 4)
    assert pool.drain_events(0.0) is None
    a = pool.allocate(4)
    pool.cache_block(a[0], H[0], None)
    b0 = pool.drain_events(1.0)
    assert pool.drain_events(1.5) is None
    pool.cache_block(a[1], H[1], None)
    b1 = pool.drain_events(2.0)
    pool.release(a)
    assert pool.drain_events(2.5) is None  # releasing records nothing
    assert pool.reset_prefix_cache() is True
    b2 = pool.drain_events(3.0)
    assert [(b.seq, b.timestamp) for b in (b0, b1, b2)] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert b2.events == (AllBlocksCleared(),)


def test_reset_refused_while_a_hashed_block_is_in_use():
    pool = BlockPool(4, 4)
    a = pool.allocate(3)
    cache_chain(pool, a, H[:3])
    pool.release([2, 1])
    pool.drain_events(0.0)
    assert pool.reset_prefix_cache() is False
    assert state(pool) == (1, 2, 1)
    assert pool.lookup(H[1]) == 1 and pool.drain_events(0.0) is None
    pool.release([0])
    assert pool.cached_block_ids() == [2, 1, 0]
    assert pool.reset_prefix_cache() is True
    assert state(pool) == (4, 0, 0)
    assert all(pool.lookup(h) is None for h in H[:3])
    assert pool.drain_events(1.0).events == (AllBlocksCleared(),)
    # the un-cached blocks joined the free queue in LRU order, behind block 3
    assert pool.allocate(4) == [3, 2, 1, 0]


def test_reset_allowed_with_unhashed_blocks_in_use():
    pool = BlockPool(3, 4)
    a = pool.allocate(2)
    pool.cache_block(a[0], H[0], None)
    pool.release([a[0]])
    assert pool.reset_prefix_cache() is True
    assert state(pool) == (2, 0, 1)


def test_caching_disabled():
    pool = BlockPool(3, 4, enable_caching=False)
    a = pool.allocate(2)
    assert pool.cache_block(a[0], H[0], None) is False
    assert pool.lookup(H[0]) is None and pool.block_hash(a[0]) is None
    pool.release([1, 0])
    assert state(pool) == (3, 0, 0)
    assert pool.reset_prefix_cache() is True
    assert pool.drain_events(0.0) is None
    assert pool.allocate(3) == [2, 1, 0]


@pytest.mark.parametrize("args, msg", [
    ((0, 4), "num_blocks must be a positive integer, got 0"),
    ((4, 0), "block_size must be a positive integer, got 0"),
    ((2.0, 4), "num_blocks must be a positive integer, got 2.0"),
])
def test_constructor_validation(args, msg):
    with pytest.raises(ValueError, match=msg):
        BlockPool(*args)


def test_allocate_rejects_negative():
    with pytest.raises(ValueError, match="integer >= 0, got -1"):
        BlockPool(2, 4).allocate(-1)


@pytest.mark.parametrize("corrupt, msg", [
    (lambda p: p._refs.__setitem__(3, -1), "block 3 has negative ref count -1"),
    (lambda p: p._free.append(2), "free queue holds blocks [2] more than once"),
    (lambda p: p._hash_to_block.__setitem__(H[0], 2),
     "block 1 holds hash 0xa000 but the map sends it to 2"),
    (lambda p: p._lru.popitem(), "block 1 is unreferenced with hash 0xa000 but not in the LRU"),
    (lambda p: p._free.popleft(), "block 2 is unreferenced and unhashed but not free"),
    (lambda p: p._refs.__setitem__(0, 2), None),  # counts still consistent: no error
    (lambda p: p._refs.__setitem__(2, 1), "block 2 has ref 1 but is in the free queue"),
])
def test_check_integrity_names_the_broken_invariant(corrupt, msg):
    pool = BlockPool(4, 4)
    a = pool.allocate(2)  # [0, 1]
    pool.cache_block(a[1], H[0], None)
    pool.release([a[1]])  # 0 in use, 1 cached, 2 and 3 free
    pool.check_integrity()
    corrupt(pool)
    if msg is None:
        pool.check_integrity()
    else:
        with pytest.raises(AssertionError) as e:
            pool.check_integrity()
        assert str(e.value) == msg


def test_random_operations_keep_every_invariant():
    rng = random.Random(1234)
    pool = BlockPool(16, 4)
    held: list[list[int]] = []
    next_hash = 1
    for step in range(1500):
        op = rng.random()
        if op < 0.35:
            got = pool.allocate(rng.randint(0, 5))
            if got is not None:
                held.append(got)
        elif op < 0.6 and held:
            blocks = held.pop(rng.randrange(len(held)))
            pool.release(reversed(blocks))
        elif op < 0.8 and held:
            blocks = rng.choice(held)
            parent = None
            for b in blocks:
                h = pool.block_hash(b)
                if h is None:
                    h = next_hash if rng.random() < 0.8 else 1  # some duplicates
                    next_hash += 1
                    pool.cache_block(b, h, parent)
                parent = h
        elif op < 0.9 and pool.num_cached:
            b = rng.choice(pool.cached_block_ids())
            pool.acquire([b])
            held.append([b])
        elif op < 0.95:
            pool.reset_prefix_cache()
        else:
            pool.drain_events(float(step))
        pool.check_integrity()
        assert pool.num_in_use == len({b for blocks in held for b in blocks})


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
