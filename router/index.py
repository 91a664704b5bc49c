"""The router's prefix index: which workers hold which KV blocks, fed by KV events.

What it answers: for a prompt's chained block hashes ``h_0 .. h_{n-1}``
(:func:`kvcache.hashing.hash_blocks`), how many *leading* blocks each worker holds. Only the
leading run counts: a worker holding ``h_0, h_1, h_3`` has 2, since block 3 is useless without
block 2.

Representation:

- Every worker gets a slot ``s`` (0, 1, 2, ...; the lowest free slot is reused after a
  removal). Sets of workers are Python ints used as bitmasks, so set algebra is one integer
  operation whatever the number of workers.
- Per block hash, one int holds everything (one dict entry a block: inserting into one big
  dict instead of three makes storing 2-3x faster, and there is no object per block for the
  garbage collector to walk)::

      bits 0..64      parent: 0 = none (a first block), 1 = unknown (a placeholder), else h + 2
      bits 65..129    children: 0 = none, 1 = several (listed in a side dict), else child + 2
      bit 130 + 2s    worker s holds the block
      bit 131 + 2s    worker s holds it *and all its ancestors*: it is "complete" there

  A placeholder stands for a block that some stored block names as its parent but that no
  worker stored yet. A block is forgotten once no worker holds it and it has no children.

Why "complete": along a prompt's chain the complete set only shrinks as ``i`` grows (complete at
block ``i`` implies complete at every block before it). So a query checks the last block first
(one lookup answers the common "someone holds it all"), else bisects to where the set of
still-matching workers shrinks, records the leavers' counts, and goes on with the others:
``O(shrinks * log n)`` lookups instead of one per block. Keeping "complete" exact costs
the writers a little: a block stored under a parent the worker lacks is an *orphan* (held, not
complete) until the parent arrives; removing a complete block turns the worker's blocks below
it into orphans. Both walk only that worker's blocks below the block concerned; KV caches evict
leaves first, so this is rare and short.

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
from router.types import ApplyResult, ApplyStatus, OverlapScores, WorkerSnapshot

_UNKNOWN = -1  # parent of a placeholder: a block named as a parent that nobody stored yet
_F = 65  # width of a hash field
_FMASK = (1 << _F) - 1
_KIDS_MASK = _FMASK << _F
_BITS = 2 * _F  # worker bits start here
_HELD_MIN = 1 << _BITS  # a block held by some worker has a state at least this
_MANY = 1  # children field: several children, in PrefixIndex._many
_PLACEHOLDER = 1  # parent field: unknown


def _parent_of(s: int) -> int | None:
    """The parent hash in a block's state; None for a first block, _UNKNOWN for a placeholder."""
    f = s & _FMASK
    return None if f == 0 else _UNKNOWN if f == _PLACEHOLDER else f - 2


class _Worker:
    __slots__ = ("blocks", "both", "dbit", "hbit", "last_seq", "orphans", "slot", "worker_id")

    def __init__(self, worker_id: str, slot: int) -> None:
        self.worker_id = worker_id
        self.slot = slot
        self.hbit = 1 << (_BITS + 2 * slot)  # holds the block
        self.dbit = self.hbit << 1  # holds it and all its ancestors
        self.both = self.hbit | self.dbit
        self.blocks: set[int] = set()
        self.orphans: set[int] = set()  # held, but some ancestor is not
        self.last_seq = -1


class PrefixIndex:
    """Block hash -> workers holding it, with per-worker event sequencing."""

    def __init__(self) -> None:
        self._state: dict[int, int] = {}  # block hash -> parent, children, worker bits
        self._many: dict[int, set[int]] = {}  # children of the blocks that have several
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

    def _kids_in(self, h: int, among: set[int]) -> Iterable[int]:
        """The children of ``h`` that are in ``among`` (a set walk over the smaller side)."""
        f = self._state[h] >> _F & _FMASK
        if f == 0:
            return ()
        if f == _MANY:
            return self._many[h] & among
        return (f - 2,) if f - 2 in among else ()

    def _link(self, p: int, c: int) -> None:
        """Record ``c`` as a child of ``p`` (``p`` becomes a placeholder if unknown)."""
        state = self._state
        s = state.get(p)
        if s is None:
            state[p] = _PLACEHOLDER | (c + 2) << _F
            return
        f = s >> _F & _FMASK
        if f == 0:
            state[p] = s | (c + 2) << _F
        elif f == _MANY:
            self._many[p].add(c)
        elif f != c + 2:
            self._many[p] = {f - 2, c}
            state[p] = s & ~_KIDS_MASK | _MANY << _F

    def _unlink(self, p: int, c: int) -> None:
        state = self._state
        s = state[p]
        f = s >> _F & _FMASK
        if f == c + 2:
            state[p] = s & ~_KIDS_MASK
        elif f == _MANY:
            many = self._many[p]
            many.discard(c)
            if len(many) == 1:
                del self._many[p]
                state[p] = s & ~_KIDS_MASK | (many.pop() + 2) << _F

    def _store(self, w: _Worker, hashes: Sequence[int], parent: int | None) -> None:
        # The hot path, tuned: a block created here is written once its child is known
        # (`pend`), so that a fresh chain costs one dict insert a block; `pdone` (the worker is
        # complete at the previous block) only changes where a block it already held says so.
        state = self._state
        sget = state.get
        hbit, dbit, both = w.hbit, w.dbit, w.both
        orphans = w.orphans
        if parent is None:
            pdone, pfield = dbit, 0
        else:
            ps = sget(parent)
            pdone, pfield = (0 if ps is None else ps & dbit), parent + 2
        p = parent
        pend, pend_s = None, 0  # a new block not written yet, and its state
        for h in hashes:
            s = sget(h)
            if s is None:  # a new block: held by this worker only
                hfield = h + 2
                if pend is not None:  # the previous block is new too: h is its one child
                    state[pend] = pend_s | hfield << _F
                elif p is not None:
                    self._link(p, h)
                if pdone:
                    pend_s = both | pfield
                else:
                    pend_s = hbit | pfield
                    orphans.add(h)
                pend, pfield = h, hfield
            else:
                if pend is not None:  # (only with a chain that contradicts known parents)
                    state[pend] = pend_s
                    pend = None
                if s & hbit:
                    pdone = s & dbit
                else:
                    if s < _HELD_MIN and s & _FMASK == _PLACEHOLDER:  # learn its parent
                        s &= ~_FMASK
                        if p is not None:
                            s |= p + 2
                            self._link(p, h)
                    if pdone:
                        state[h] = s | both
                        if orphans and s & _KIDS_MASK:
                            self._adopt(w, h)
                    else:
                        state[h] = s | hbit
                        orphans.add(h)
                pfield = h + 2
            p = h
        if pend is not None:
            state[pend] = pend_s
        w.blocks.update(hashes)

    def _adopt(self, w: _Worker, h: int) -> None:
        """``h`` became complete for ``w``: so do its orphans below it, recursively."""
        state, orphans, dbit = self._state, w.orphans, w.dbit
        stack = [h]
        while stack and orphans:
            for c in self._kids_in(stack.pop(), orphans):
                orphans.discard(c)
                state[c] |= dbit
                stack.append(c)

    def _orphan_below(self, w: _Worker, h: int) -> None:
        """``h`` stopped being complete for ``w``: so do its blocks below it, recursively."""
        state, orphans, blocks, dbit = self._state, w.orphans, w.blocks, w.dbit
        stack = [h]
        while stack:
            for c in self._kids_in(stack.pop(), blocks):
                s = state[c]
                if s & dbit:
                    state[c] = s ^ dbit
                    orphans.add(c)
                    stack.append(c)

    def _remove(self, w: _Worker, hashes: Iterable[int]) -> None:
        state = self._state
        sget = state.get
        hbit, dbit, both = w.hbit, w.dbit, w.both
        blocks, orphans = w.blocks, w.orphans
        for h in hashes:
            s = sget(h)
            if s is None or not s & hbit:
                continue  # not held by this worker: nothing to do
            blocks.discard(h)
            if s & dbit:
                state[h] = s = s ^ both
                if s & _KIDS_MASK:
                    self._orphan_below(w, h)
            else:
                state[h] = s = s ^ hbit
                orphans.discard(h)
            if s >> _F == 0:  # held by nobody, no children
                self._drop(h)

    def _clear(self, w: _Worker) -> None:
        state = self._state
        keep = ~w.both
        blocks = w.blocks
        for h in blocks:
            state[h] &= keep
        w.blocks = set()
        w.orphans = set()
        for h in blocks:
            s = state.get(h)
            if s is not None and s >> _F == 0:
                self._drop(h)

    def _drop(self, h: int) -> None:
        """Forget an unheld childless block, then its ancestors that become so."""
        state = self._state
        while True:
            f = state.pop(h) & _FMASK
            if f <= _PLACEHOLDER:  # a first block, or a placeholder
                return
            p = f - 2
            self._unlink(p, h)
            if state[p] >> _F:  # still held by someone, or still has children
                return
            h = p
