"""Per-request KV block bookkeeping on top of :class:`~kvcache.block_pool.BlockPool`.

What the scheduler does, per request id (one engine step at a time):

1. Before a request's first allocation, :meth:`KVCacheManager.get_computed_prefix` finds the
   longest run of its leading full blocks already in the prefix cache. It is a pure lookup:
   no reference is taken, so call it right before :meth:`~KVCacheManager.allocate_slots` in
   the same step (another request's allocation may evict those blocks in between; a stale
   prefix is refused with an error). It never returns the whole sequence: at least one token
   is always left to compute, since the runner needs it to produce the next token's logits.
2. :meth:`~KVCacheManager.allocate_slots` takes the prefix (one reference per block) on the
   first call and makes sure the request holds blocks for every token held so far plus the
   ``num_new_tokens`` scheduled now. It returns the whole block table, or None when the blocks
   do not fit; then nothing changed (the scheduler may preempt someone and retry, or wait).
   Tokens held after a successful call count as computed at the next call: the runner computes
   them in this step. So every block that becomes full with this step's tokens is registered
   in the prefix cache right away, under its chained hash.
3. :meth:`~KVCacheManager.free` releases the request's blocks tail first when it finishes, is
   aborted or preempted; its full blocks stay findable (cached) until evicted, tail blocks
   evicted before head blocks.

``token_ids`` passed for one request id must only grow between calls (prompt, then prompt
plus outputs so far): block hashes are kept per request and extended incrementally, so every
token is hashed once. :meth:`~KVCacheManager.free` forgets them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.block_pool import BlockPool, blocks_needed
from kvcache.events import KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from kvcache.holds import BlockHolds, PinnedBlocks


@dataclass(frozen=True)
class ComputedPrefix:
    """Leading blocks of a sequence found in the prefix cache (``num_tokens`` = blocks * size)."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


@dataclass(frozen=True)
class PrefixCacheStats:
    """Cumulative prefix-cache counters, counted at each request's first allocation."""

    num_requests: int
    queried_tokens: int  # tokens known at first allocation (the prompt)
    hit_tokens: int  # of those, served from the prefix cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class _RequestBlocks:
    __slots__ = ("blocks", "num_registered", "num_tokens", "table")

    def __init__(self, blocks: list[int], num_tokens: int, num_registered: int) -> None:
        self.blocks = blocks
        self.table = tuple(blocks)
        self.num_tokens = num_tokens  # token slots held (computed once the step ran)
        self.num_registered = num_registered  # leading full blocks passed to cache_block


_NO_PREFIX = ComputedPrefix()


class KVCacheManager:
    """Block tables of the running requests of one worker, with prefix caching."""

    def __init__(
        self, num_blocks: int, hash_config: BlockHashConfig, enable_prefix_caching: bool = True
    ) -> None:
        if not isinstance(hash_config, BlockHashConfig):
            raise TypeError(f"hash_config must be a BlockHashConfig, got {type(hash_config)}")
        self.hash_config = hash_config
        self.block_size = hash_config.block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.pool = BlockPool(num_blocks, hash_config.block_size, self.enable_prefix_caching)
        self.holds = BlockHolds(self.pool)  # pins for KV handles, reservations for imports
        self._reqs: dict[str, _RequestBlocks] = {}
        self._hashes: dict[str, list[int]] = {}
        self._num_requests = 0
        self._queried_tokens = 0
        self._hit_tokens = 0

    # ---------------------------------------------------------------- scheduler API

    def get_computed_prefix(self, request_id: str, token_ids: Sequence[int]) -> ComputedPrefix:
        """Longest run of leading full blocks of ``token_ids`` held in the prefix cache."""
        if len(token_ids) == 0:
            raise ValueError(f"request {request_id!r} has no tokens; a prompt needs >= 1 token")
        if not self.enable_prefix_caching:
            return _NO_PREFIX
        max_blocks = (len(token_ids) - 1) // self.block_size  # leave >= 1 token to compute
        hashes = self._ensure_hashes(request_id, token_ids, max_blocks)
        lookup = self.pool.lookup
        found: list[int] = []
        for i in range(max_blocks):
            block_id = lookup(hashes[i])
            if block_id is None:
                break
            found.append(block_id)
        return ComputedPrefix(tuple(found), len(found) * self.block_size)

    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_new_tokens: int,
        computed: ComputedPrefix | None = None,
    ) -> tuple[int, ...] | None:
        """Blocks for the tokens held so far plus ``num_new_tokens``; None if they do not fit.

        ``computed`` (first allocation only) is the prefix from :meth:`get_computed_prefix`.
        Returns the request's whole block table. On None nothing changed.
        """
        bs = self.block_size
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, int) \
                or num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be an integer >= 1, got {num_new_tokens!r}")
        state = self._reqs.get(request_id)
        if state is None:
            prefix = _NO_PREFIX if computed is None else computed
            self._check_prefix(request_id, token_ids, prefix)
            held, num_blocks_held = prefix.num_tokens, len(prefix.block_ids)
        else:
            if computed is not None and computed.block_ids:
                raise ValueError(
                    f"request {request_id!r} already holds blocks; pass `computed` only on its "
                    "first allocate_slots call"
                )
            prefix = _NO_PREFIX
            held, num_blocks_held = state.num_tokens, len(state.blocks)
        total = held + num_new_tokens
        if total > len(token_ids):
            raise ValueError(
                f"request {request_id!r}: {held} tokens held + {num_new_tokens} new = {total} "
                f"but only {len(token_ids)} token ids were given; pass all known tokens"
            )
        need = max(0, blocks_needed(total, bs) - num_blocks_held)
        pool = self.pool
        # Cached prefix blocks leave the allocatable set when acquired: count them first so
        # that a refusal changes nothing.
        reclaimed = sum(1 for b in prefix.block_ids if pool.ref_count(b) == 0)
        if need > pool.num_allocatable - reclaimed:
            return None
        if prefix.block_ids:
            pool.acquire(prefix.block_ids)
        new_blocks = pool.allocate(need)
        assert new_blocks is not None, "allocation checked to fit"
        if state is None:
            state = _RequestBlocks(list(prefix.block_ids) + new_blocks, total,
                                   len(prefix.block_ids))
            self._reqs[request_id] = state
            self._num_requests += 1
            self._queried_tokens += len(token_ids)
            self._hit_tokens += prefix.num_tokens
        else:
            if new_blocks:
                state.blocks.extend(new_blocks)
                state.table = state.table + tuple(new_blocks)
            state.num_tokens = total
        if self.enable_prefix_caching:
            self._register_full_blocks(request_id, token_ids, state)
        return state.table

    def free(self, request_id: str) -> None:
        """Release the request's blocks, tail first, and forget its hashes (no-op if unknown)."""
        self._hashes.pop(request_id, None)
        state = self._reqs.pop(request_id, None)
        if state is not None:
            self.pool.release(reversed(state.blocks))

    # ---------------------------------------------------------------- disaggregation

    def pin_prompt(self, request_id: str, prompt_token_ids: Sequence[int]) -> PinnedBlocks:
        """Pin the full prompt blocks of a request that still holds its blocks (call before
        :meth:`free`); see :mod:`kvcache.holds`. With prefix caching off nothing is hashed,
        so nothing is pinned."""
        self._state(request_id)
        n = len(prompt_token_ids) // self.block_size if self.enable_prefix_caching else 0
        hashes = self._ensure_hashes(request_id, prompt_token_ids, n) if n else []
        return self.holds.pin(request_id, hashes[:n], self.block_size)

    def cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """How many leading ``block_hashes`` the pool holds now (cached or in use)."""
        if not self.enable_prefix_caching:
            return 0
        lookup = self.pool.lookup
        n = 0
        for h in block_hashes:
            if lookup(h) is None:
                break
            n += 1
        return n

    def reset_prefix_cache(self) -> bool:
        """Drop all cached blocks; False (nothing changed) while a cached block is in use."""
        return self.pool.reset_prefix_cache()

    def drain_events(self, now: float) -> KvEventBatch | None:
        return self.pool.drain_events(now)

    # ---------------------------------------------------------------- queries

    def has_request(self, request_id: str) -> bool:
        """True while ``request_id`` holds blocks (between its first allocation and free)."""
        return request_id in self._reqs

    def block_table(self, request_id: str) -> tuple[int, ...]:
        return self._state(request_id).table

    def num_computed_tokens(self, request_id: str) -> int:
        """Token slots the request holds (all computed once the current step has run)."""
        return self._state(request_id).num_tokens

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free + evictable cached)."""
        return self.pool.num_allocatable

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_in_use

    @property
    def usage(self) -> float:
        return self.pool.usage

    def prefix_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._num_requests, self._queried_tokens, self._hit_tokens)

    def check_integrity(self) -> None:
        """Pool invariants, plus: block refs equal the number of tables holding each block."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        bs = self.block_size
        holders.update(self.holds.all_blocks())
        for rid, state in self._reqs.items():
            holders.update(state.blocks)
            if state.table != tuple(state.blocks):
                raise AssertionError(f"request {rid!r}: cached block table is out of date")
            if len(state.blocks) != blocks_needed(state.num_tokens, bs):
                raise AssertionError(
                    f"request {rid!r} holds {len(state.blocks)} blocks for "
                    f"{state.num_tokens} tokens (block size {bs})"
                )
            hashes = self._hashes.get(rid, [])
            for i in range(state.num_registered):
                h = self.pool.block_hash(state.blocks[i])
                if h is not None and (i >= len(hashes) or h != hashes[i]):
                    raise AssertionError(
                        f"request {rid!r} block {i} (id {state.blocks[i]}) holds hash {h:#x}, "
                        "not the hash of its tokens"
                    )
        for block_id in range(self.pool.num_blocks):
            if self.pool.ref_count(block_id) != holders[block_id]:
                raise AssertionError(
                    f"block {block_id} has ref {self.pool.ref_count(block_id)} but "
                    f"{holders[block_id]} request(s) and hold(s) hold it"
                )

    # ---------------------------------------------------------------- internals

    def _state(self, request_id: str) -> _RequestBlocks:
        state = self._reqs.get(request_id)
        if state is None:
            raise KeyError(f"request {request_id!r} holds no KV blocks (never allocated, or freed)")
        return state

    def _ensure_hashes(self, request_id: str, token_ids: Sequence[int], n: int) -> list[int]:
        """The request's first ``n`` block hashes (``n`` <= full blocks), hashing only new ones."""
        hashes = self._hashes.setdefault(request_id, [])
        have = len(hashes)
        if n > have:
            bs = self.block_size
            parent = hashes[-1] if hashes else None
            hashes.extend(hash_blocks(token_ids[have * bs : n * bs], self.hash_config, parent))
        return hashes

    def _check_prefix(self, request_id: str, token_ids: Sequence[int], prefix: ComputedPrefix
                      ) -> None:
        k = len(prefix.block_ids)
        if prefix.num_tokens != k * self.block_size:
            raise ValueError(
                f"ComputedPrefix covers {k} blocks but claims {prefix.num_tokens} tokens; "
                f"expected {k * self.block_size} (use get_computed_prefix)"
            )
        if k == 0:
            return
        if not self.enable_prefix_caching:
            raise ValueError("prefix caching is disabled; pass computed=None")
        if prefix.num_tokens >= len(token_ids):
            raise ValueError(
                f"request {request_id!r}: the prefix covers all {len(token_ids)} tokens; "
                "at least one token must be computed"
            )
        hashes = self._ensure_hashes(request_id, token_ids, k)
        for i, block_id in enumerate(prefix.block_ids):
            if self.pool.block_hash(block_id) != hashes[i]:
                raise ValueError(
                    f"request {request_id!r}: stale ComputedPrefix, block {block_id} no longer "
                    f"holds block {i} of this prompt; call get_computed_prefix right before "
                    "allocate_slots in the same step"
                )

    def _register_full_blocks(
        self, request_id: str, token_ids: Sequence[int], state: _RequestBlocks
    ) -> None:
        full = state.num_tokens // self.block_size
        if full <= state.num_registered:
            return
        hashes = self._ensure_hashes(request_id, token_ids, full)
        cache_block, blocks = self.pool.cache_block, state.blocks
        for i in range(state.num_registered, full):
            cache_block(blocks[i], hashes[i], hashes[i - 1] if i else None)
        state.num_registered = full
