"""Feeds a router's prefix index from the workers' KV events, repairing gaps from JetStream.

The router side of the event protocol of :mod:`kvcache.events`, live (the EventSubscriber
delivers every batch of stream ``FERRY_KV`` from its first message, then as they come):

1. A batch of a worker that is not under repair goes to ``router.apply_events``. APPLIED and
   DUPLICATE need nothing more; UNKNOWN_WORKER (not registered here) is dropped.
2. GAP (a batch skipped ahead: a lost message, or batches delivered before the worker was
   registered here): the worker enters *repair*. Its later live batches are buffered, in
   arrival order, and a task replays the worker's subject from the seq after the last one
   applied (``EventSubscriber.replay``). When the replay returns, the replayed and buffered
   batches are merged by seq (each seq once) and applied in order, and the worker leaves
   repair. All of that after the replay's ``await`` runs without yielding to the loop, so no
   live batch can slip in between.
3. A seq that is in neither (the stream no longer holds it: older than its limits, or dropped
   by the worker's publisher when its queue overflowed) cannot be recovered from events: the
   worker is *resynchronised*: its blocks are cleared (``load_snapshot`` with nothing, at the
   seq before the next batch there is) and the batches after the hole are applied. The index
   then misses blocks the worker may still hold, which only costs hits, never sends a request
   to a worker for blocks it no longer has.
4. A replay that fails (NATS unreachable) is tried again after a short wait, as long as the
   worker stays registered; its live batches keep buffering meanwhile.

:meth:`KvFeed.catch_up` starts a repair by hand: used when a worker is registered after the
subscriber started (its earlier batches were delivered while it was unknown and dropped).

Everything runs on one asyncio loop, the frontend's: the subscriber's callbacks, the repair
tasks and the router's other callers (routing, load). The router is touched only from that
loop, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors

from kvcache.events import KvEventBatch
from kvcache.wire import LoadReport
from orchestrator.event_subscriber import EventSubscriber
from router.router import Router
from router.types import ApplyStatus
from workers.server.nats_link import DEFAULT_BACKOFF, Backoff

logger = logging.getLogger(__name__)

_RETRY_S = 0.2


class KvFeed:
    """The EventSubscriber of one router, with gap repair (see the module docstring)."""

    def __init__(self, router: Router, nats_url: str, *,
                 on_load: Callable[[LoadReport], None], repair_timeout_s: float = 5.0,
                 name: str = "ferry-router", backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.router = router
        self._repair_timeout_s = repair_timeout_s
        # Looked up per call, so that a wrapper set on the instance sees every batch.
        self.subscriber = EventSubscriber(nats_url, lambda w, b: self.on_kv(w, b), on_load,
                                          name=name, backoff=backoff)
        self._repairing: dict[str, list[KvEventBatch]] = {}  # worker -> buffered live batches
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self.applied = 0  # batches applied (live or replayed)
        self.gaps = 0  # repairs started (gaps seen, catch-ups)
        self.repairs = 0  # repairs finished
        self.resyncs = 0  # workers cleared because the stream no longer held a batch

    async def start(self, timeout: float = 0.0) -> bool:
        self._started = True
        return await self.subscriber.start(timeout)

    async def close(self) -> None:
        tasks, self._tasks = set(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._repairing.clear()
        await self.subscriber.close()

    @property
    def repairing(self) -> frozenset[str]:
        return frozenset(self._repairing)

    # ---------------------------------------------------------------- live batches

    def on_kv(self, worker_id: str, batch: KvEventBatch) -> None:
        buffered = self._repairing.get(worker_id)
        if buffered is not None:
            buffered.append(batch)
            return
        result = self.router.apply_events(worker_id, batch)
        if result.status is ApplyStatus.APPLIED:
            self.applied += 1
        elif result.status is ApplyStatus.GAP:
            logger.info("KV events of worker %s: gap before batch %d (missing %s); replaying",
                        worker_id, batch.seq, result.missing)
            self._start_repair(worker_id, [batch])

    def catch_up(self, worker_id: str) -> None:
        """Replay the worker's stored batches after the last one applied (see above)."""
        if self._started and worker_id not in self._repairing:
            self._start_repair(worker_id, [])

    def forget(self, worker_id: str) -> None:
        """The worker left the router: drop its buffered batches (its repair ends itself)."""
        self._repairing.pop(worker_id, None)

    # ---------------------------------------------------------------- repair

    def _start_repair(self, worker_id: str, buffered: list[KvEventBatch]) -> None:
        self.gaps += 1
        self._repairing[worker_id] = buffered
        task = asyncio.get_running_loop().create_task(self._repair(worker_id),
                                                      name=f"kv-repair-{worker_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _registered(self, worker_id: str) -> bool:
        return self.router.index.has_worker(worker_id)

    async def _repair(self, worker_id: str) -> None:
        while True:
            if not self._registered(worker_id) or worker_id not in self._repairing:
                self._repairing.pop(worker_id, None)
                return
            from_seq = self.router.index.last_seq(worker_id) + 1
            try:
                replayed = await self.subscriber.replay(worker_id, from_seq,
                                                        timeout=self._repair_timeout_s)
            except (ConnectionError, TimeoutError, nats.errors.Error) as exc:
                logger.warning("replaying the KV events of worker %s failed (%s); retrying",
                               worker_id, exc)
                await asyncio.sleep(_RETRY_S)
                continue
            buffered = self._repairing.pop(worker_id, None)
            if buffered is None or not self._registered(worker_id):
                return  # the worker left meanwhile
            self._apply_in_order(worker_id, replayed + buffered)
            self.repairs += 1
            return

    def _apply_in_order(self, worker_id: str, batches: list[KvEventBatch]) -> None:
        by_seq: dict[int, KvEventBatch] = {}
        for b in batches:
            by_seq.setdefault(b.seq, b)
        router = self.router
        for seq in sorted(by_seq):
            batch = by_seq[seq]
            result = router.apply_events(worker_id, batch)
            if result.status is ApplyStatus.GAP:
                logger.warning(
                    "KV events %s of worker %s are no longer in the stream; clearing its "
                    "blocks in the index and going on from batch %d",
                    result.missing, worker_id, seq)  # fmt: skip
                self.resyncs += 1
                router.load_snapshot(worker_id, (), seq - 1)
                result = router.apply_events(worker_id, batch)
            if result.status is ApplyStatus.APPLIED:
                self.applied += 1


__all__ = ["KvFeed"]
