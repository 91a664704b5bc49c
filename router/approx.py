"""Predicted KV caches for routing without KV events (the ``approx`` mode).

Without events the router assumes that a worker holds the blocks of every prompt it was sent,
for ``ttl_s`` seconds after the last time it was sent them:

- :meth:`ApproxCaches.record` (at routing time ``now``): the chosen worker now holds the
  prompt's blocks until ``now + ttl_s``; a block it already held gets the later expiry.
- :meth:`ApproxCaches.expire` (before each lookup): every block whose expiry is ``<= now``
  leaves the prediction. A block sent at ``t`` thus counts for lookups at ``t <= now < t+ttl_s``.

The predictions live in a :class:`~router.index.PrefixIndex` (the router's own, fed by nothing
else), so lookups are the same leading-run overlaps as with events.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from router.index import PrefixIndex


class ApproxCaches:
    def __init__(self, index: PrefixIndex, ttl_s: float) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) \
                or not 0 < ttl_s < math.inf:
            raise ValueError(f"approx_ttl_s must be a finite number of seconds > 0, got "
                             f"{ttl_s!r}")
        self.index = index
        self.ttl_s = float(ttl_s)
        self._expiry: dict[str, dict[int, float]] = {}  # worker -> block -> expires at
        self._queue: deque[tuple[float, str, tuple[int, ...]]] = deque()  # by expiry

    def add_worker(self, worker_id: str) -> None:
        self._expiry[worker_id] = {}

    def remove_worker(self, worker_id: str) -> None:
        self._expiry.pop(worker_id, None)  # queued records of it are skipped when they expire

    def record(self, worker_id: str, block_hashes: Sequence[int], now: float) -> None:
        """``worker_id`` was sent a prompt with these (chained) blocks at ``now``."""
        if not block_hashes:
            return
        expires = now + self.ttl_s
        exp = self._expiry[worker_id]
        for h in block_hashes:
            exp[h] = expires
        hashes = tuple(block_hashes)
        self.index.store(worker_id, hashes)
        self._queue.append((expires, worker_id, hashes))

    def expire(self, now: float) -> int:
        """Drop the predictions whose expiry is ``<= now``; returns how many blocks left."""
        queue = self._queue
        dropped = 0
        while queue and queue[0][0] <= now:
            _, worker_id, hashes = queue.popleft()
            exp = self._expiry.get(worker_id)
            if exp is None:
                continue
            gone = [h for h in reversed(hashes) if exp.get(h, math.inf) <= now]  # leaves first
            for h in gone:
                del exp[h]
            if gone:
                self.index.remove(worker_id, gone)
                dropped += len(gone)
        return dropped

    def num_blocks(self, worker_id: str) -> int:
        return len(self._expiry[worker_id])
