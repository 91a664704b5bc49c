"""The physical KV block pool of one worker, with its prefix cache and KV event log.

Block states. Every physical block id ``0 .. num_blocks - 1`` is in exactly one state:

- free: ref count 0, no hash. Never handed out by a lookup; reused first by :meth:`allocate`.
- cached: ref count 0, holds a hash. Evictable, and still findable by :meth:`lookup` until
  evicted. Cached blocks sit in an LRU queue (least recently released first).
- in use: ref count > 0 (one reference per request that holds it), with or without a hash.

Transitions (who owns a block when):

- :meth:`allocate` hands out ``n`` blocks with ref 1, owned by the caller: free blocks first
  (in the free queue's order, see below), then cached blocks evicted from the LRU head. An
  eviction drops the block's hash and records :class:`BlockRemoved`. When ``n`` blocks do not
  fit, it returns None and changes nothing ("does not fit right now" is a value).
- :meth:`acquire` adds a reference to an in-use or cached block (a prefix-cache hit); a cached
  block leaves the LRU. Acquiring a free block is a caller bug (its content is garbage).
- :meth:`release` drops one reference per listed id, in the order given. A block reaching 0
  joins the MRU end of the LRU when it holds a hash, else the back of the free queue. Releasing
  a sequence's blocks tail first therefore makes its tail evictable before its head.
- :meth:`cache_block` gives a full, in-use block its chained hash (the caller guarantees the
  block's KV is or will be computed in the current engine step) and records
  :class:`BlockStored`. When another block already holds that hash, the existing mapping wins
  and the new block stays unhashed (it returns to free, not to the LRU, when released).
- :meth:`reset_prefix_cache` drops every cached hash (the blocks become free) and records
  :class:`AllBlocksCleared`; it refuses (returns False, changes nothing) while any hashed
  block is in use.

Free queue order: at start the ids in ascending order, so a fresh pool hands out 0, 1, 2, ...;
a block that becomes free again (released unhashed, or un-cached by a reset) joins the back.
The order is deterministic, and every hot operation is O(1) per block.

Events: recorded in order and drained once per engine step by :meth:`drain_events` into one
:class:`KvEventBatch` numbered 0, 1, 2, ... (a step that recorded nothing uses no number).
Consecutive stores that continue one chain (the new block's parent is the previous stored
event's last hash) merge into one :class:`BlockStored`; consecutive evictions merge into one
:class:`BlockRemoved`. Event order is otherwise kept exactly, so a router that applies the
events in order ends with the pool's set of hashes.

With ``enable_caching=False`` nothing is ever hashed: :meth:`cache_block` does nothing,
:meth:`lookup` finds nothing, released blocks go straight back to free and no event is
recorded.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch


class _PendingStored:
    """A BlockStored being built during a step (mutable so that merging is O(1))."""

    __slots__ = ("hashes", "parent")

    def __init__(self, block_hash: int, parent: int | None) -> None:
        self.hashes = [block_hash]
        self.parent = parent


class _PendingRemoved:
    __slots__ = ("hashes",)

    def __init__(self, block_hash: int) -> None:
        self.hashes = [block_hash]


class BlockPool:
    """Ref-counted physical KV blocks with a hash-addressed, LRU-evicted prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = bool(enable_caching)
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, LRU first
        self._num_in_use = 0
        self._events: list[_PendingStored | _PendingRemoved | AllBlocksCleared] = []
        self._next_seq = 0

    # ---------------------------------------------------------------- counters

    @property
    def num_free(self) -> int:
        """Free blocks that hold no hash."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks that hold a hash (evictable)."""
        return len(self._lru)

    @property
    def num_in_use(self) -> int:
        return self._num_in_use

    @property
    def num_allocatable(self) -> int:
        """Blocks :meth:`allocate` can hand out right now (free + cached)."""
        return len(self._free) + len(self._lru)

    @property
    def usage(self) -> float:
        """Share of blocks in use, 0..1."""
        return self._num_in_use / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._refs[self._check_id(block_id)]

    def block_hash(self, block_id: int) -> int | None:
        """The hash ``block_id`` holds in the prefix cache, or None."""
        return self._hash_of[self._check_id(block_id)]

    def cached_block_ids(self) -> list[int]:
        """Cached blocks in eviction order (next evicted first)."""
        return list(self._lru)

    # ---------------------------------------------------------------- operations

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks with ref 1, or None (nothing changed) when fewer are allocatable."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of blocks to allocate must be an integer >= 0, got {n!r}")
        if n > len(self._free) + len(self._lru):
            return None
        out: list[int] = []
        free, refs = self._free, self._refs
        while len(out) < n and free:
            out.append(free.popleft())
        while len(out) < n:
            block_id, _ = self._lru.popitem(last=False)
            self._evict(block_id)
            out.append(block_id)
        for block_id in out:
            refs[block_id] = 1
        self._num_in_use += n
        return out

    def lookup(self, block_hash: int) -> int | None:
        """The block holding ``block_hash`` (cached or in use), or None. Changes nothing."""
        return self._hash_to_block.get(block_hash)

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each listed block; each must be in use or cached."""
        ids = list(block_ids)
        for block_id in ids:
            self._check_id(block_id)
            if self._refs[block_id] == 0 and self._hash_of[block_id] is None:
                raise ValueError(
                    f"cannot acquire block {block_id}: it is free (no references, no hash); "
                    "only blocks found by lookup() or held by a request can be acquired"
                )
        refs, lru = self._refs, self._lru
        for block_id in ids:
            if refs[block_id] == 0:
                del lru[block_id]
                self._num_in_use += 1
            refs[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed block, in the order given (see module docstring)."""
        ids = list(block_ids)
        for block_id, count in Counter(ids).items():
            self._check_id(block_id)
            if self._refs[block_id] < count:
                raise ValueError(
                    f"cannot release block {block_id} {count} time(s): it has "
                    f"{self._refs[block_id]} reference(s) (double free?)"
                )
        refs, hash_of = self._refs, self._hash_of
        for block_id in ids:
            refs[block_id] -= 1
            if refs[block_id] == 0:
                self._num_in_use -= 1
                if hash_of[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._lru[block_id] = None

    def cache_block(self, block_id: int, block_hash: int, parent_hash: int | None) -> bool:
        """Register full in-use ``block_id`` under ``block_hash`` (chained on ``parent_hash``).

        Returns True when the block now holds the hash (a new mapping, or the same one again),
        False when caching is off or another block already holds ``block_hash`` (the block
        then stays unhashed and no event is recorded).
        """
        self._check_id(block_id)
        if self._refs[block_id] == 0:
            raise ValueError(
                f"cannot cache block {block_id}: it is not in use; cache a block while the "
                "request that filled it still holds it"
            )
        if not self.enable_caching:
            return False
        current = self._hash_of[block_id]
        if current is not None:
            if current == block_hash:
                return True
            raise ValueError(
                f"block {block_id} already holds hash {current:#018x}; cannot re-cache it as "
                f"{block_hash:#018x} (a block's content never changes while it is in use)"
            )
        if block_hash in self._hash_to_block:
            return False
        self._hash_to_block[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        last = self._events[-1] if self._events else None
        if (
            isinstance(last, _PendingStored)
            and parent_hash is not None
            and last.hashes[-1] == parent_hash
        ):
            last.hashes.append(block_hash)
        else:
            self._events.append(_PendingStored(block_hash, parent_hash))
        return True

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; False (and no change) while a hashed block is in use."""
        if len(self._hash_to_block) != len(self._lru):
            return False
        if not self.enable_caching:
            return True
        for block_id in self._lru:
            self._hash_of[block_id] = None
            self._free.append(block_id)
        self._lru.clear()
        self._hash_to_block.clear()
        self._events.append(AllBlocksCleared())
        return True

    def drain_events(self, now: float) -> KvEventBatch | None:
        """Every event recorded since the last drain, as one batch; None when there is none."""
        if not self._events:
            return None
        events: list[KvEvent] = []
        for ev in self._events:
            if isinstance(ev, _PendingStored):
                events.append(BlockStored(tuple(ev.hashes), ev.parent))
            elif isinstance(ev, _PendingRemoved):
                events.append(BlockRemoved(tuple(ev.hashes)))
            else:
                events.append(ev)
        self._events = []
        batch = KvEventBatch(seq=self._next_seq, timestamp=now, events=tuple(events))
        self._next_seq += 1
        return batch

    # ---------------------------------------------------------------- checks

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (O(num_blocks))."""
        n = self.num_blocks
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dup = [b for b, c in Counter(self._free).items() if c > 1]
            raise AssertionError(f"free queue holds blocks {dup} more than once")
        for block_id in range(n):
            ref, h = self._refs[block_id], self._hash_of[block_id]
            if ref < 0:
                raise AssertionError(f"block {block_id} has negative ref count {ref}")
            in_free, in_lru = block_id in free_set, block_id in self._lru
            if ref > 0 and (in_free or in_lru):
                where = "free queue" if in_free else "LRU"
                raise AssertionError(f"block {block_id} has ref {ref} but is in the {where}")
            if ref == 0 and h is None and not in_free:
                raise AssertionError(f"block {block_id} is unreferenced and unhashed but not free")
            if ref == 0 and h is not None and not in_lru:
                raise AssertionError(
                    f"block {block_id} is unreferenced with hash {h:#x} but not in the LRU")
            if in_free and in_lru:
                raise AssertionError(f"block {block_id} is both free and cached")
            if in_free and h is not None:
                raise AssertionError(f"free block {block_id} still holds hash {h:#x}")
            if in_lru and h is None:
                raise AssertionError(f"cached block {block_id} holds no hash")
            if h is not None and self._hash_to_block.get(h) != block_id:
                raise AssertionError(
                    f"block {block_id} holds hash {h:#x} but the map sends it to "
                    f"{self._hash_to_block.get(h)}"
                )
        for h, block_id in self._hash_to_block.items():
            if not 0 <= block_id < n or self._hash_of[block_id] != h:
                raise AssertionError(f"hash {h:#x} maps to block {block_id}, which does not hold it")
        in_use = sum(1 for r in self._refs if r > 0)
        if in_use != self._num_in_use:
            raise AssertionError(f"in-use counter {self._num_in_use} != {in_use} referenced blocks")
        total = len(self._free) + len(self._lru) + in_use
        if total != n:
            raise AssertionError(
                f"free {len(self._free)} + cached {len(self._lru)} + in use {in_use} = {total}, "
                f"expected {n} blocks"
            )
        if not self.enable_caching and self._hash_to_block:
            raise AssertionError("caching is disabled but blocks hold hashes")

    # ---------------------------------------------------------------- internals

    def _check_id(self, block_id: int) -> int:
        if isinstance(block_id, bool) or not isinstance(block_id, int) \
                or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} is out of range [0, {self.num_blocks})")
        return block_id

    def _evict(self, block_id: int) -> None:
        """Drop the hash of a cached block just taken out of the LRU; record the removal."""
        block_hash = self._hash_of[block_id]
        assert block_hash is not None
        self._hash_of[block_id] = None
        del self._hash_to_block[block_hash]
        last = self._events[-1] if self._events else None
        if isinstance(last, _PendingRemoved):
            last.hashes.append(block_hash)
        else:
            self._events.append(_PendingRemoved(block_hash))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens (ceil division)."""
    return -(-num_tokens // block_size)


__all__ = ["BlockPool", "blocks_needed"]
