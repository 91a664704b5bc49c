"""The router's prefix index: which workers hold which KV blocks, fed by KV events.

What it answers: for a prompt's chained block hashes ``h_0 .. h_{n-1}``
(:func:`kvcache.hashing.hash_blocks`), how many *leading* blocks each worker holds. Only the
leading run counts: a worker holding ``h_0, h_1, h_3`` has 2, since block 3 is useless without
block 2.

Representation (:mod:`router.index_state`, the base class that holds the blocks and keeps them
exact): every worker has a slot, sets of workers are int bitmasks, and per block hash one int
holds its parent, its children and two bits per worker: "holds the block", and "holds it *and
all its ancestors*" ("complete" there).

Why "complete": along a prompt's chain the complete set only shrinks as ``i`` grows (complete at
block ``i`` implies complete at every block before it). So a query checks the last block first
(one lookup answers the common "someone holds it all"), else bisects to where the set of
still-matching workers shrinks, records the leavers' counts, and goes on with the others:
``O(shrinks * log n)`` lookups instead of one per block.

Event protocol (router side of :mod:`kvcache.events`): per worker the index remembers the last
applied batch ``seq`` (-1 before any). :meth:`PrefixIndex.apply` applies a batch whose seq is
the next one; a seq already applied is a duplicate and changes nothing; a seq that skips ahead
is a gap: nothing is applied and the missing range is returned. The caller repairs the worker
(replays the missing batches in order, or :meth:`~PrefixIndex.load_snapshot` a snapshot taken
at some seq) and then applies the batch again. Events for a worker the index does not know
(not added yet, or removed while its events were in flight) change nothing.

Stored / removed / cleared: a stored event adds the worker to each block (a block it already
holds is unchanged); a removed event takes it off (a block it does not hold is ignored); a
cleared event takes it off every block it holds. Queries must pass a real chain (``hashes[i]``
chained on ``hashes[i - 1]``, as ``hash_blocks`` makes them): counts follow the parents that
the stored events declared.

No I/O, no threads, no clock: the caller owns ordering and concurrency.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from router.index_state import _BITS, IndexState, _parent_of, _Worker
from router.types import ApplyResult, ApplyStatus, OverlapScores, WorkerSnapshot


class PrefixIndex(IndexState):
    """Block hash -> workers holding it, with per-worker event sequencing."""

    def __init__(self) -> None:
        super().__init__()
        self._workers: dict[str, _Worker] = {}
        self._ids: list[str | None] = []  # slot -> worker id
        self._free_slots: list[int] = []  # heap
        self._done_bits = 0  # the complete bits of every worker

    # ---------------------------------------------------------------- workers

    def add_worker(self, worker_id: str) -> int:
        """Give ``worker_id`` a slot (the lowest free one) and return it."""
        if not isinstance(worker_id, str) or not worker_id:
            raise ValueError(f"worker_id must be a non-empty string, got {worker_id!r}")
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already in the index; remove it first")
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._ids[slot] = worker_id
        else:
            slot = len(self._ids)
            self._ids.append(worker_id)
        w = self._workers[worker_id] = _Worker(worker_id, slot)
        self._done_bits |= w.dbit
        return slot

    def remove_worker(self, worker_id: str) -> bool:
        """Drop the worker and all its blocks; False if it was not in the index."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return False
        self._clear(w)
        self._done_bits &= ~w.dbit
        self._ids[w.slot] = None
        heapq.heappush(self._free_slots, w.slot)
        return True

    def has_worker(self, worker_id: str) -> bool:
        return worker_id in self._workers

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(self._workers)

    def slot(self, worker_id: str) -> int:
        return self._worker(worker_id).slot

    def last_seq(self, worker_id: str) -> int:
        """Last applied batch seq of the worker (-1 before any)."""
        return self._worker(worker_id).last_seq

    def num_blocks(self, worker_id: str) -> int:
        return len(self._worker(worker_id).blocks)

    def holders(self, block_hash: int) -> frozenset[str]:
        """Workers holding ``block_hash`` (whether or not they hold its ancestors)."""
        s = self._state.get(block_hash, 0)
        return frozenset(w.worker_id for w in self._workers.values() if s & w.hbit)

    # ---------------------------------------------------------------- events

    def apply(self, worker_id: str, batch: KvEventBatch) -> ApplyResult:
        """Apply one batch of the worker's events in seq order (see the module docstring)."""
        w = self._workers.get(worker_id)
        seq = batch.seq
        if w is None:
            return ApplyResult(ApplyStatus.UNKNOWN_WORKER, worker_id, seq, -1)
        expected = w.last_seq + 1
        if seq < expected:
            return ApplyResult(ApplyStatus.DUPLICATE, worker_id, seq, w.last_seq)
        if seq > expected:
            return ApplyResult(ApplyStatus.GAP, worker_id, seq, w.last_seq, range(expected, seq))
        for ev in batch.events:
            if type(ev) is BlockStored:
                self._store(w, ev.block_hashes, ev.parent_hash)
            elif type(ev) is BlockRemoved:
                self._remove(w, ev.block_hashes)
            elif type(ev) is AllBlocksCleared:
                self._clear(w)
            else:
                raise TypeError(f"unknown KV event {ev!r} in batch {seq} of {worker_id!r}")
        w.last_seq = seq
        return ApplyResult(ApplyStatus.APPLIED, worker_id, seq, seq)

    def store(self, worker_id: str, block_hashes: Sequence[int], parent_hash: int | None = None
              ) -> None:
        """Record a chain of blocks on the worker, outside seq order (approximate mode)."""
        self._store(self._worker(worker_id), block_hashes, parent_hash)

    def remove(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """Take the worker off these blocks, outside seq order (approximate mode)."""
        self._remove(self._worker(worker_id), block_hashes)

    def clear(self, worker_id: str) -> None:
        self._clear(self._worker(worker_id))

    # ---------------------------------------------------------------- repair

    def snapshot(self, worker_id: str) -> WorkerSnapshot:
        """The worker's blocks and last applied seq, as chains, parents before children."""
        w = self._worker(worker_id)
        state, blocks = self._state, w.blocks
        out: list[BlockStored] = []
        done: set[int] = set()
        for h in blocks:
            chain = []
            x: int | None = h
            while x in blocks and x not in done:  # climb to a block already emitted, or out
                done.add(x)  # type: ignore[arg-type]
                chain.append(x)
                x = _parent_of(state[x])  # type: ignore[index]
            if chain:
                chain.reverse()
                out.append(BlockStored(tuple(chain), _parent_of(state[chain[0]])))
        return WorkerSnapshot(worker_id, w.last_seq, tuple(out))

    def load_snapshot(self, worker_id: str, stored: Iterable[BlockStored], seq: int) -> None:
        """Replace the worker's blocks by ``stored`` (its cache as of batch ``seq``).

        A snapshot is stored events rather than bare hashes: their parents are what tells a
        chain apart from stray blocks (see the module docstring).
        """
        w = self._worker(worker_id)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < -1:
            raise ValueError(f"snapshot seq must be an integer >= -1, got {seq!r}")
        stored = list(stored)
        for ev in stored:
            if not isinstance(ev, BlockStored):
                raise TypeError(f"a snapshot holds BlockStored events only, got {ev!r}")
        self._clear(w)
        for ev in stored:
            self._store(w, ev.block_hashes, ev.parent_hash)
        w.last_seq = seq

    # ---------------------------------------------------------------- queries

    def overlap(self, block_hashes: Sequence[int]) -> OverlapScores:
        """Per worker, how many leading blocks of the chain ``block_hashes`` it holds."""
        n = len(block_hashes)
        if n == 0:
            return OverlapScores({}, 0)
        get = self._state.get
        active = get(block_hashes[0], 0) & self._done_bits  # complete bits only
        if not active:
            return OverlapScores({}, n)
        last = n - 1
        last_mask = get(block_hashes[last], 0)
        ids = self._ids
        scores: dict[str, int] = {}
        lo = 0  # every active worker is complete at block lo
        while True:
            c_hi = last_mask & active
            if c_hi == active:  # they all hold the whole chain
                hi, dropped, c_hi = n, active, 0
            else:  # bisect for the first block where the active set shrinks (last: it has)
                hi = last
                while hi - lo > 1:
                    mid = (lo + hi) >> 1
                    c = get(block_hashes[mid], 0) & active
                    if c == active:
                        lo = mid
                    else:
                        hi, c_hi = mid, c
                dropped = active ^ c_hi
            while dropped:  # the workers leaving the active set hold exactly `hi` blocks
                low = dropped & -dropped
                scores[ids[low.bit_length() - _BITS - 2 >> 1]] = hi  # type: ignore[index]
                dropped ^= low
            if not c_hi:
                return OverlapScores(scores, n)
            active, lo = c_hi, hi

    # ---------------------------------------------------------------- checks

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (for tests; slow)."""
        from router.index_check import check_index

        check_index(self)

    # ---------------------------------------------------------------- internals

    def _worker(self, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise KeyError(f"worker {worker_id!r} is not in the index; add_worker first")
        return w
