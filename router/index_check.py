"""The invariants of :class:`router.index.PrefixIndex`, checked the slow obvious way (tests).

For every worker and block: the held bit is set exactly for the blocks the worker lists; the
complete bit exactly when the worker holds the block and, climbing the parents, every ancestor
up to a first block; the orphans are the held blocks that are not complete. For every block:
someone holds it or it has children; parent and children fields agree both ways; a block with
several children has them listed (two or more) in the side dict, and only then.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from router.index_state import _BITS, _F, _FMASK, _MANY, _UNKNOWN, _parent_of

if TYPE_CHECKING:
    from router.index import PrefixIndex


def _kids(index: PrefixIndex, h: int) -> Iterable[int]:
    f = index._state[h] >> _F & _FMASK
    return () if f == 0 else index._many[h] if f == _MANY else (f - 2,)


def _chain_held(index: PrefixIndex, blocks: set[int], h: int) -> bool:
    x: int | None = h
    while x is not None:
        if x == _UNKNOWN or x not in blocks:
            return False
        x = _parent_of(index._state[x])
    return True


def check_index(index: PrefixIndex) -> None:
    """Raise AssertionError naming the first broken invariant."""
    state, many_kids = index._state, index._many
    all_bits = 0
    for w in index._workers.values():
        all_bits |= w.both
        if index._ids[w.slot] != w.worker_id:
            raise AssertionError(f"slot {w.slot} does not name {w.worker_id!r}")
        if not w.orphans <= w.blocks or not w.blocks <= state.keys():
            raise AssertionError(f"{w.worker_id!r} lists orphans or blocks it does not hold")
        for h, s in state.items():
            held = h in w.blocks
            complete = held and _chain_held(index, w.blocks, h)
            if (bool(s & w.hbit), bool(s & w.dbit)) != (held, complete):
                raise AssertionError(f"block {h:#x}: bits of {w.worker_id!r} are stale")
            if held and (h in w.orphans) == complete:
                raise AssertionError(f"block {h:#x}: orphan mark of {w.worker_id!r} is stale")
    for h, s in state.items():
        if s >> _BITS & ~(all_bits >> _BITS):
            raise AssertionError(f"block {h:#x} has bits of no worker")
        if s >> _F == 0:
            raise AssertionError(f"block {h:#x} is held by nobody and has no children")
        many = many_kids.get(h)
        if (s >> _F & _FMASK == _MANY) != (many is not None) or many is not None \
                and len(many) < 2:
            raise AssertionError(f"block {h:#x}: its list of children is malformed")
        for c in _kids(index, h):
            if c not in state or _parent_of(state[c]) != h:
                raise AssertionError(f"block {h:#x} lists child {c:#x} whose parent differs")
        p = _parent_of(s)
        if p is not None and p != _UNKNOWN and h not in _kids(index, p):
            raise AssertionError(f"block {h:#x} is not a child of its parent {p:#x}")
    if not many_kids.keys() <= state.keys():
        raise AssertionError("children are listed under a forgotten block")
