"""router.index: event sequencing, stored/removed/cleared semantics, leading-run overlaps."""

from __future__ import annotations

import random

import pytest

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from router.index import PrefixIndex
from router.types import ApplyStatus

CFG = BlockHashConfig(block_size=4, seed=0)
# Three prompts of 6 blocks: B shares A's first 3 blocks, C shares nothing.
A = hash_blocks(list(range(24)), CFG)
B = hash_blocks(list(range(12)) + list(range(100, 112)), CFG)
C = hash_blocks(list(range(200, 224)), CFG)
assert A[:3] == B[:3] and A[3] != B[3] and len(set(A) | set(C)) == 12


def stored(hashes, parent=None) -> BlockStored:
    return BlockStored(tuple(hashes), parent)


def batch(seq: int, *events) -> KvEventBatch:
    return KvEventBatch(seq, float(seq), tuple(events))


def index(*workers: str) -> PrefixIndex:
    idx = PrefixIndex()
    for w in workers:
        idx.add_worker(w)
    return idx


@pytest.mark.parametrize(
    "seqs, statuses, last",
    [
        ([0, 1, 2], ["applied", "applied", "applied"], 2),
        ([0, 0], ["applied", "duplicate"], 0),
        ([0, 1, 0, 1], ["applied", "applied", "duplicate", "duplicate"], 1),
        ([1], ["gap"], -1),
        ([0, 3, 1, 2, 3], ["applied", "gap", "applied", "applied", "applied"], 3),
    ],
)
def test_apply_sequencing(seqs, statuses, last):
    idx = index("w")
    got = [idx.apply("w", batch(s, stored(A[:1]))).status.value for s in seqs]
    assert got == statuses
    assert idx.last_seq("w") == last


def test_gap_reports_the_missing_range_and_applies_nothing():
    idx = index("w")
    idx.apply("w", batch(0, stored(A[:2])))
    r = idx.apply("w", batch(4, stored(A[2:4], A[1])))
    assert (r.status, r.missing, r.last_applied_seq, r.ok) == (ApplyStatus.GAP, range(1, 4), 0,
                                                               False)
    assert idx.overlap(A).scores == {"w": 2}


def test_duplicate_changes_nothing():
    idx = index("w")
    idx.apply("w", batch(0, stored(A[:4])))
    r = idx.apply("w", batch(0, BlockRemoved(tuple(A[:4]))))
    assert r.status is ApplyStatus.DUPLICATE and r.ok
    assert idx.overlap(A).scores == {"w": 4}


def test_unknown_worker_changes_nothing():
    idx = index("w")
    r = idx.apply("ghost", batch(0, stored(A)))
    assert (r.status, r.ok) == (ApplyStatus.UNKNOWN_WORKER, False)
    assert idx.overlap(A).scores == {}


@pytest.mark.parametrize(
    "events, query, expected",
    [
        # leading-run rule: only the blocks before the first missing one count
        ([stored(A)], A, {"a": 6}),
        ([stored(A)], B, {"a": 3}),
        ([stored(A)], C, {}),
        ([stored(A), BlockRemoved((A[3],))], A, {"a": 3}),
        ([stored(A), BlockRemoved((A[0],))], A, {}),
        ([stored(A), BlockRemoved((A[5],))], A, {"a": 5}),
        ([stored(A), AllBlocksCleared()], A, {}),
        ([stored(A), AllBlocksCleared(), stored(A[:2])], A, {"a": 2}),
        # a removed middle block stored again makes the blocks below it count again
        ([stored(A), BlockRemoved((A[2],)), stored(A[2:3], A[1])], A, {"a": 6}),
        # blocks stored before their parent count once the parent arrives
        ([stored(A[3:], A[2])], A, {}),
        ([stored(A[3:], A[2]), stored(A[:3])], A, {"a": 6}),
        ([stored(A[3:], A[2]), stored(A[:2])], A, {"a": 2}),
        # removing blocks it does not hold is ignored
        ([stored(A[:2]), BlockRemoved((C[0], A[4]))], A, {"a": 2}),
        # storing a held block again changes nothing
        ([stored(A[:3]), stored(A[:2])], A, {"a": 3}),
    ],
)
def test_events_and_leading_run(events, query, expected):
    idx = index("a", "b")
    idx.apply("a", batch(0, *events))
    idx.check_integrity()
    s = idx.overlap(query)
    assert (s.scores, s.num_blocks) == (expected, len(query))


def test_overlap_counts_per_worker():
    idx = index("a", "b", "c", "d")
    idx.apply("a", batch(0, stored(A)))
    idx.apply("b", batch(0, stored(B)))
    idx.apply("c", batch(0, stored(A[:5])))
    idx.apply("d", batch(0, stored(C)))
    assert idx.overlap(A).scores == {"a": 6, "b": 3, "c": 5}
    assert idx.overlap(B).scores == {"a": 3, "b": 6, "c": 3}
    assert idx.overlap(B[:2]).scores == {"a": 2, "b": 2, "c": 2}
    assert idx.overlap(C).scores == {"d": 6}
    assert idx.overlap([]).scores == {} and idx.overlap([]).num_blocks == 0
    assert idx.holders(A[4]) == {"a", "c"} and idx.holders(C[0]) == {"d"}


def test_remove_worker_drops_its_blocks_and_its_slot_is_reused():
    idx = index("a", "b", "c")
    assert [idx.slot(w) for w in "abc"] == [0, 1, 2]
    idx.apply("a", batch(0, stored(A)))
    idx.apply("b", batch(0, stored(A[:4])))
    assert idx.remove_worker("a") and not idx.remove_worker("a")
    assert idx.overlap(A).scores == {"b": 4}
    idx.check_integrity()
    assert idx.add_worker("e") == 0  # lowest free slot
    assert idx.overlap(A).scores == {"b": 4}  # the new worker inherits nothing
    assert idx.last_seq("e") == -1
    idx.remove_worker("b")
    assert idx._state == {}  # nobody holds anything: every block is forgotten


def test_clear_only_touches_that_worker():
    idx = index("a", "b")
    idx.apply("a", batch(0, stored(A)))
    idx.apply("b", batch(0, stored(B)))
    idx.apply("a", batch(1, AllBlocksCleared()))
    assert idx.overlap(A).scores == {"b": 3}
    assert (idx.num_blocks("a"), idx.num_blocks("b")) == (0, 6)
    idx.check_integrity()


def test_add_worker_twice_is_refused():
    idx = index("a")
    with pytest.raises(ValueError, match="already in the index"):
        idx.add_worker("a")
    with pytest.raises(KeyError, match="add_worker first"):
        idx.store("nobody", A)


def test_snapshot_repairs_a_gap():
    source = index("w")  # e.g. another router replica that saw every batch
    mine = index("w")
    source.apply("w", batch(0, stored(A)))
    source.apply("w", batch(1, stored(B[3:], B[2]), BlockRemoved((A[5],))))
    mine.apply("w", batch(0, stored(A)))
    nxt = batch(2, stored(C))
    source.apply("w", nxt)
    assert mine.apply("w", nxt).missing == range(1, 2)
    snap = source.snapshot("w")
    assert snap.seq == 2
    emitted: list[int] = []  # chains come parents first
    for ev in snap.stored:
        assert ev.parent_hash is None or ev.parent_hash in emitted
        emitted.extend(ev.block_hashes)
    assert sorted(emitted) == sorted(set(A[:5]) | set(B) | set(C))
    mine.load_snapshot("w", snap.stored, snap.seq)
    mine.check_integrity()
    for q in (A, B, C):
        assert mine.overlap(q).scores == source.overlap(q).scores
    assert mine.overlap(A).scores == {"w": 5} and mine.overlap(B).scores == {"w": 6}
    assert mine.apply("w", nxt).status is ApplyStatus.DUPLICATE
    assert mine.apply("w", batch(3, BlockRemoved((C[0],)))).status is ApplyStatus.APPLIED
    assert mine.overlap(C).scores == {}


def test_many_workers_beyond_one_machine_word():
    idx = index(*[f"w{i}" for i in range(70)])
    for i in range(70):  # worker i holds the first i % 7 blocks of A
        if i % 7:
            idx.apply(f"w{i}", batch(0, stored(A[: i % 7])))
    assert idx.overlap(A).scores == {f"w{i}": i % 7 for i in range(70) if i % 7}


def test_random_histories_match_a_brute_force_model():
    rng = random.Random(1234)
    parent: dict[int, int | None] = {}  # a forest of chained blocks
    for h in range(1, 40):
        parent[h] = None if h <= 3 else rng.randrange(1, h)

    def chain(h):
        out = []
        while h is not None:
            out.append(h)
            h = parent[h]
        return out[::-1]

    workers = ["a", "b", "c"]
    idx = index(*workers)
    held = {w: set() for w in workers}
    seq = dict.fromkeys(workers, 0)
    for step in range(600):
        w = rng.choice(workers)
        r = rng.random()
        if r < 0.5:
            c = chain(rng.randrange(1, 40))
            i = rng.randrange(len(c))
            seg = c[i: rng.randrange(i, len(c)) + 1]
            ev = stored(seg, parent[seg[0]])
            held[w].update(seg)
        elif r < 0.9:
            hs = rng.sample(range(1, 40), 3)
            ev = BlockRemoved(tuple(hs))
            held[w].difference_update(hs)
        elif r < 0.95:
            ev = AllBlocksCleared()
            held[w].clear()
        else:
            idx.remove_worker(w)
            idx.add_worker(w)
            held[w].clear()
            seq[w] = 0
            continue
        assert idx.apply(w, batch(seq[w], ev)).status is ApplyStatus.APPLIED
        seq[w] += 1
        if step % 25 == 0:
            idx.check_integrity()
        for h in rng.sample(range(1, 40), 4):
            q = chain(h)
            expected = {}
            for ww in workers:
                k = next((i for i, x in enumerate(q) if x not in held[ww]), len(q))
                if k:
                    expected[ww] = k
            assert idx.overlap(q).scores == expected, (step, q)
    idx.check_integrity()


def test_integrity_check_sees_a_stale_bit():
    idx = index("a")
    idx.apply("a", batch(0, stored(A)))
    idx.check_integrity()
    idx._state[A[3]] ^= idx._workers["a"].dbit  # "a" no longer complete at block 3
    with pytest.raises(AssertionError, match="bits of 'a' are stale"):
        idx.check_integrity()
