"""The oracle prefix reuse of a trace: what an infinite KV cache shared by all workers gives.

Definition (the ``oracle_reuse`` of a replay report). Requests are taken in arrival order
(the order the replay sends them). Request ``k`` has ``n_k`` prompt tokens (the trace's hash
ids turned into token ids, cut to ``input_length``: :func:`router.trace.trace_token_ids`) and
the chained hashes ``H_k`` of its full blocks at the replay's ``block_size``
(:func:`kvcache.hashing.hash_blocks`, the workers' and the router's hash). Its oracle hit is
the longest leading run of ``H_k`` whose hashes all occur in some earlier request's ``H_j``
(``j < k``, whether or not that request has been computed yet), capped at
``(n_k - 1) // block_size`` blocks: an engine always computes at least the last prompt token
(it needs its logits), so a prompt that is entirely a repeat still computes its last block.
Then

    oracle_reuse = sum_k(hit_blocks_k * block_size) / sum_k(n_k)

which is directly comparable with the replay's ``prefix_reuse`` (cached prompt tokens over
prompt tokens, the engines apply the same cap). It is computed on the generated token ids at
``block_size`` granularity rather than on the trace's 512-token hash ids: two prompts cut
inside the same 512-token id still share the whole 64-token blocks before the cut, and the
engines can reuse exactly those.

Since hash ``i`` of a chain pins every token of blocks ``0..i``, and every request adds all
its hashes, the set of hashes seen is closed under prefixes: the leading run is found by
bisection.
"""

from __future__ import annotations

from collections.abc import Sequence


class OracleCache:
    """Infinite shared prefix cache: counts each request's oracle hit, then remembers it."""

    def __init__(self, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = block_size
        self._seen: set[int] = set()
        self.prompt_tokens = 0
        self.hit_tokens = 0

    def add(self, block_hashes: Sequence[int], prompt_len: int) -> int:
        """Count one request (in arrival order); returns its oracle hit in blocks."""
        if prompt_len < 1 or len(block_hashes) != prompt_len // self.block_size:
            raise ValueError(f"{len(block_hashes)} block hashes do not describe a prompt of "
                             f"{prompt_len} tokens at block_size {self.block_size}")
        seen = self._seen
        lo, hi = 0, len(block_hashes)
        while lo < hi:
            mid = (lo + hi) >> 1
            if block_hashes[mid] in seen:
                lo = mid + 1
            else:
                hi = mid
        seen.update(block_hashes[lo:])
        hit = min(lo, (prompt_len - 1) // self.block_size)
        self.prompt_tokens += prompt_len
        self.hit_tokens += hit * self.block_size
        return hit

    @property
    def reuse(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


__all__ = ["OracleCache"]
