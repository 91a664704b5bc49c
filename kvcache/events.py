"""KV events: what a worker's block pool tells the routers about its prefix cache.

Protocol (worker side): the block pool records an event each time a full block enters the
prefix cache (stored), leaves it (removed, on eviction) or the whole cache is dropped
(cleared). The engine drains the recorded events once per step into one
:class:`KvEventBatch` with the next sequence number (0, 1, 2, ... per worker, no gaps; a step
that recorded nothing produces no batch and uses no number).

Protocol (router side): batches are applied in sequence order. A batch whose number was
already applied is ignored (applying twice changes nothing); a batch whose number skips ahead
reveals a gap, which the router repairs by replay or snapshot before applying it.

A stored event lists consecutive blocks of one sequence: ``block_hashes[0]`` is chained on
``parent_hash`` (None when it is the sequence's first block), and each further hash on the one
before it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_hash: int | None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class KvEventBatch:
    seq: int
    timestamp: float
    events: tuple[KvEvent, ...]
