"""Blocks held outside any request: pinned for a KV handle, or reserved for a KV import.

Disaggregation needs two kinds of block ownership besides a request's block table
(DESIGN.md, "One request, disaggregated"). Both are *holds*: a named set of block references
owned by the worker on behalf of someone else, counted by the manager's integrity check like
a request's table.

Prefill worker (holder of a handle):

1. When a ``prefill_only`` request finishes, :meth:`BlockHolds.pin` takes one extra reference
   on each of its leading full prompt blocks that holds its hash in the pool (the block a
   lookup of that hash finds), under a new hold id, before the request's own references are
   released. The blocks are then "in use" and cannot be evicted or reused; their content
   (full, hashed blocks) never changes.
2. :meth:`BlockHolds.release` drops the hold's references (tail first, so that the tail is
   evicted before the head): after the puller is done, after the handle's TTL, or on
   shutdown. A hold is released exactly once; releasing an unknown hold returns False.

Decode worker (importer):

1. :meth:`BlockHolds.reserve` allocates ``n`` blocks (ref 1, no hash, content garbage) under a
   new hold id, or returns None when they do not fit now ("does not fit" is a value). Nobody
   else can see or take them: they are not in the prefix cache.
2. The transport writes the pulled KV into them (any thread; the engine never touches
   blocks it did not schedule).
3. :meth:`BlockHolds.commit` gives them their chained hashes, in order, then releases the
   hold: the blocks become cached (LRU), findable by the next request's prefix lookup, and
   their ``BlockStored`` events go out with the next engine step's batch. A hash some other
   block already holds keeps that block (the reserved copy is returned to free). On a failed
   pull the caller :meth:`release`\\ s the hold instead: the blocks go back to free, unhashed.

All calls run where the engine runs (one thread); holds are not thread-safe.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.block_pool import BlockPool


@dataclass(frozen=True)
class PinnedBlocks:
    """A pin: ``block_ids[i]`` holds ``block_hashes[i]``, the i-th full block of the prompt."""

    hold_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]
    num_tokens: int  # prompt tokens whose KV the full blocks hold (len(block_ids) * block_size)


class BlockHolds:
    """Named block references of one pool (see the module docstring)."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._holds: dict[str, tuple[int, ...]] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._holds)

    def __contains__(self, hold_id: object) -> bool:
        return hold_id in self._holds

    def blocks(self, hold_id: str) -> tuple[int, ...]:
        try:
            return self._holds[hold_id]
        except KeyError:
            raise KeyError(f"no hold {hold_id!r} (never made, or released)") from None

    def all_blocks(self) -> list[int]:
        """Every held block id, once per reference a hold has on it."""
        return [b for ids in self._holds.values() for b in ids]

    def ids_of(self, prefix: str) -> list[str]:
        """Hold ids made with ``prefix`` (``pin``/``reserve``) and not yet released."""
        start = f"{prefix}#"
        return [h for h in self._holds if h.startswith(start) and "#" not in h[len(start):]]

    def num_blocks(self) -> int:
        return sum(len(ids) for ids in self._holds.values())

    def pin(self, prefix: str, block_hashes: Sequence[int], block_size: int) -> PinnedBlocks:
        """Pin the blocks holding the leading ``block_hashes`` (stops at the first hash the
        pool does not hold). The caller still holds them (a request's table), so every found
        block is in use and cannot vanish between lookup and acquire."""
        ids: list[int] = []
        for h in block_hashes:
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            ids.append(block_id)
        hold_id = self._new_id(prefix)
        self.pool.acquire(ids)
        self._holds[hold_id] = tuple(ids)
        return PinnedBlocks(hold_id, tuple(ids), tuple(block_hashes[:len(ids)]),
                            len(ids) * block_size)

    def reserve(self, prefix: str, n: int) -> tuple[str, tuple[int, ...]] | None:
        """``n`` fresh blocks under a new hold: (hold id, block ids), or None if they do not fit."""
        ids = self.pool.allocate(n)
        if ids is None:
            return None
        hold_id = self._new_id(prefix)
        self._holds[hold_id] = tuple(ids)
        return hold_id, tuple(ids)

    def commit(self, hold_id: str, block_hashes: Sequence[int], parent_hash: int | None) -> int:
        """Hash the reserved blocks in order (``block_hashes[i]`` for the i-th block, chained on
        ``parent_hash``), then release the hold. Returns how many blocks now hold their hash
        (the others' hashes were held by another block already)."""
        ids = self.blocks(hold_id)
        if len(block_hashes) != len(ids):
            raise ValueError(f"hold {hold_id!r} has {len(ids)} blocks but {len(block_hashes)} "
                             "hashes were given; give one hash per reserved block")
        stored = 0
        parent = parent_hash
        for block_id, h in zip(ids, block_hashes, strict=True):
            if self.pool.cache_block(block_id, h, parent):
                stored += 1
            parent = h
        self.release(hold_id)
        return stored

    def release(self, hold_id: str) -> bool:
        """Drop the hold's references, tail first; False when there is no such hold."""
        ids = self._holds.pop(hold_id, None)
        if ids is None:
            return False
        self.pool.release(reversed(ids))
        return True

    def release_all(self) -> int:
        ids = list(self._holds)
        for hold_id in ids:
            self.release(hold_id)
        return len(ids)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}#{next(self._ids)}"


__all__ = ["BlockHolds", "PinnedBlocks"]
