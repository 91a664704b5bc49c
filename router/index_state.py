"""The prefix index's block state and the writers that keep it exact (the base of
:class:`router.index.PrefixIndex`, which adds workers, event sequencing, repair and queries).

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

Keeping "complete" exact (what the queries of :mod:`router.index` rely on) costs the writers
a little: a block stored under a parent the worker lacks is an *orphan* (held, not complete)
until the parent arrives; removing a complete block turns the worker's blocks below it into
orphans. Both walk only that worker's blocks below the block concerned; KV caches evict leaves
first, so this is rare and short.

The writers (``_store``, ``_remove``, ``_clear``) carry out the stored / removed / cleared
events whose meaning :mod:`router.index` documents.

No I/O, no threads, no clock: the caller owns ordering and concurrency.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_UNKNOWN = -1  # parent of a placeholder: a block named as a parent that nobody stored yet
_F = 65  # width of a hash field
_FMASK = (1 << _F) - 1
_KIDS_MASK = _FMASK << _F
_BITS = 2 * _F  # worker bits start here
_HELD_MIN = 1 << _BITS  # a block held by some worker has a state at least this
_MANY = 1  # children field: several children, in IndexState._many
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


class IndexState:
    """Block hash -> parent, children and worker bits (see the module docstring), with the
    writers that take a :class:`_Worker` (its slot's bits, its blocks and orphans)."""

    def __init__(self) -> None:
        self._state: dict[int, int] = {}  # block hash -> parent, children, worker bits
        self._many: dict[int, set[int]] = {}  # children of the blocks that have several

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


__all__ = ["IndexState"]
