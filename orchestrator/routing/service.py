"""The live router of one frontend process: a :class:`router.Router` fed from NATS and
consulted by the frontend for every request.

Wiring (:meth:`RoutingService.attach`): the frontend's ``pick_worker`` becomes
:meth:`RoutingService.pick` and its ``route_listener`` the service, so that

- ``Frontend.add_worker`` hands the worker's Info to :meth:`worker_added`, which registers it
  with the router (``router.add_worker``). A block size or hash seed other than the router's
  is refused with ValueError naming the option to change; the frontend then does not add the
  worker (and ``ferry serve`` fails to start with that message). ``remove_worker`` ->
  :meth:`worker_removed`;
- each request is placed by :meth:`pick`: the frontend's RouteRequest becomes a
  ``router.types.RouteRequest`` with the prompt's token ids, keyed by the frontend's route id
  (its worker-side request id: unique across replicas). The router chooses among all the
  workers it knows; when its choice is not one of the request's candidates (a worker not ready
  now, or one that already refused this request), the lowest-cost candidate is taken instead.
  A second pick for the same id (the frontend retrying on another worker) first ends the
  previous attempt's in-flight entry;
- the frontend's stream calls :meth:`first_token` (-> ``router.on_prefill_done``) and
  :meth:`finished` (-> ``router.on_finished``; every ending: done, error, cancelled).

Disaggregated deployments: every worker registers with its role (``InfoResponse.role``:
prefill, decode, aggregated; unset counts as aggregated) through a
:class:`router.disagg.DisaggRouter` over the same router (``self.disagg``). Once prefill or
decode workers are registered the frontend plans each request with :meth:`plan_disagg` (its
``DisaggPlanner``) instead of :meth:`pick`: a decode worker among its candidates and, when the
prompt is prefilled remotely, a prefill worker (see :mod:`router.disagg`);
:meth:`first_token`, :meth:`decode_started`, :meth:`prefill_failed` and :meth:`finished` keep
both hops' in-flight entries right, and are shared with the other replicas like any entry.
Aggregated deployments route exactly as before (:meth:`pick`).

Feeds, by mode (:class:`~orchestrator.routing.config.RoutingConfig`):

- ``kv``: KV event batches and load reports through :class:`~orchestrator.routing.kv_feed.
  KvFeed` (an EventSubscriber with gap repair from JetStream); a replica that starts (or
  restarts) replays the stream and so rebuilds its index (:meth:`catch_up` waits for it);
- ``approx``: load reports only (its overlaps are predicted from its own decisions);
- ``kv`` and ``approx``: in-flight load shared with the other replicas
  (:mod:`orchestrator.routing.inflight`) unless ``share_inflight`` is off;
- ``round_robin``, ``random``: nothing; no NATS connection.

Concurrency: everything (frontend calls, subscriber callbacks, repair tasks, peer updates)
runs on the event loop that called :meth:`start`, the frontend's; the router is only touched
from that loop, so no lock is needed. Call every method from that loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

from ferry.v1 import common_pb2
from kvcache.events import KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from kvcache.wire import LoadReport, decode_kv_batch
from orchestrator.frontend.types import DisaggPlan
from orchestrator.frontend.types import RouteRequest as FrontendRouteRequest
from orchestrator.routing.config import RoutingConfig
from orchestrator.routing.inflight import InflightKind, InflightUpdate, PeerLink, apply_update
from orchestrator.routing.kv_feed import KvFeed
from router.cost import choose_worker
from router.disagg import DisaggReason, DisaggRouter, LoadChange, PoolRole
from router.router import Router, make_router
from router.types import RouteRequest as RouterRouteRequest
from router.types import RouterStats, WorkerInfo
from workers.server.nats_link import DEFAULT_BACKOFF, KV_STREAM, Backoff, kv_subject

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingStats:
    router: RouterStats  # achieved vs achievable prefix hits (see router.types.RouterStats)
    workers: int  # registered with the router
    kv_batches_applied: int
    gaps: int  # repairs started (gaps seen, and catch-ups of late-registered workers)
    repairs: int  # repairs finished
    resyncs: int  # workers cleared because the stream no longer held a missing batch
    peer_updates: int  # in-flight updates applied from other replicas
    fallbacks: int  # picks where the router's choice was not a candidate
    disagg_decisions: dict[str, int] = field(default_factory=dict)  # by DisaggReason value


def worker_info(worker_id: str, info) -> WorkerInfo:
    """A worker's ``ferry.v1.InfoResponse`` as the router's WorkerInfo."""
    try:
        hash_config = BlockHashConfig(block_size=int(info.block_size), seed=int(info.hash_seed))
    except ValueError as exc:
        raise ValueError(f"worker {worker_id!r} reports an unusable KV block layout ({exc})"
                         ) from None
    return WorkerInfo(worker_id, hash_config, max(1, int(info.num_blocks)))


_ROLES = {common_pb2.WORKER_ROLE_PREFILL: PoolRole.PREFILL,
          common_pb2.WORKER_ROLE_DECODE: PoolRole.DECODE}


def worker_role(info) -> PoolRole:
    """A worker's ``ferry.v1.InfoResponse.role`` as its pool (unset: aggregated)."""
    return _ROLES.get(int(info.role), PoolRole.BOTH)


class RoutingService:
    """See the module docstring."""

    def __init__(self, config: RoutingConfig, nats_url: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 backoff: Backoff = DEFAULT_BACKOFF) -> None:
        if not isinstance(config, RoutingConfig):
            raise TypeError(f"config must be a RoutingConfig, got {type(config).__name__}")
        if config.needs_nats and not nats_url:
            raise ValueError(f"router mode {config.mode.value!r} reads events from NATS: give "
                             "nats_url, or use mode 'round_robin' or 'random'")
        self.config = config
        self.replica_id = config.replica_id or f"r{os.urandom(4).hex()}"
        self.router: Router = make_router(
            config.mode, config.hash_config, config.cost, config.seed, clock,
            approx_ttl_s=config.approx_ttl_s, load_grace_s=config.load_grace_s,
            track_achievable=config.track_achievable)
        self.disagg = DisaggRouter(self.router, config.disagg, seed=config.seed, clock=clock,
                                   approx_ttl_s=config.approx_ttl_s,
                                   track_achievable=config.track_achievable)
        self._feed: KvFeed | None = None
        self._peers: PeerLink | None = None
        if config.needs_kv_events:
            self._feed = KvFeed(self.router, nats_url, on_load=self.on_load,  # type: ignore[arg-type]
                                repair_timeout_s=config.repair_timeout_s,
                                name=f"ferry-router-{self.replica_id}-kv", backoff=backoff)
        if config.needs_nats:  # in-flight sharing, load reports (approx), stream queries
            self._peers = PeerLink(
                nats_url, self.replica_id,  # type: ignore[arg-type]
                self.on_peer_update if config.share_inflight else None,
                on_load=None if self._feed is not None else self.on_load, backoff=backoff)
        self._share = config.share_inflight and self._peers is not None
        self._rng = random.Random(config.seed)  # the fallback's tie-breaks
        self._started = False
        self._peer_updates = 0
        self._fallbacks = 0
        self._turn = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 5.0) -> bool:
        """Connect and subscribe in the background; True when connected within ``timeout``
        seconds (always True without NATS). False is not an error: the links keep trying."""
        if self._started:
            raise RuntimeError("RoutingService.start() was already called")
        self._started = True
        waits = []
        if self._feed is not None:
            waits.append(self._feed.start(timeout))
        if self._peers is not None:
            waits.append(self._peers.start(timeout))
        return all(await asyncio.gather(*waits))

    async def close(self) -> None:
        if self._feed is not None:
            await self._feed.close()
        if self._peers is not None:
            await self._peers.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def feed(self) -> KvFeed | None:
        """The KV event feed (``kv`` mode), else None."""
        return self._feed

    @property
    def peers(self) -> PeerLink | None:
        """The NATS link for in-flight sharing and stream queries (``kv``, ``approx``)."""
        return self._peers

    def attach(self, frontend) -> None:
        """Route ``frontend``'s requests here and add the router's gauges to its /metrics."""
        from orchestrator.routing.metrics import RoutingCollector

        frontend.pick_worker = self.pick
        frontend.route_listener = self
        frontend.disagg.planner = self
        frontend.metrics.registry.register(RoutingCollector(self))

    async def catch_up(self, timeout: float = 10.0) -> bool:
        """Wait until the index holds, for every registered worker, the last KV batch the
        stream held when called (True), or ``timeout`` seconds passed (False). Without KV
        events there is nothing to wait for (True)."""
        if self._feed is None or self._peers is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        client = await self._peers.link.wait_connected(timeout)
        if client is None:
            return False
        js = client.jetstream(timeout=max(0.1, deadline - loop.time()))
        targets: dict[str, int] = {}
        for worker_id in self.router.workers:
            try:
                msg = await js.get_last_msg(KV_STREAM, kv_subject(worker_id))
            except Exception:  # noqa: BLE001, S112 - no message for it (or NATS trouble): none to wait
                continue
            try:
                sender, batch = decode_kv_batch(msg.data)
            except ValueError:
                continue
            if sender == worker_id:
                targets[worker_id] = batch.seq
        index = self.router.index
        while True:
            if all(not index.has_worker(w) or index.last_seq(w) >= seq
                   for w, seq in targets.items()):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)

    # ---------------------------------------------------------------- feeds

    def on_load(self, report: LoadReport) -> None:
        self.router.apply_load(report)

    def on_kv(self, worker_id: str, batch: KvEventBatch) -> None:
        """A KV batch (the feed calls this; exposed for tests and embedding)."""
        if self._feed is None:
            raise ValueError(f"router mode {self.config.mode.value!r} takes no KV events")
        self._feed.on_kv(worker_id, batch)

    def on_peer_update(self, update: InflightUpdate) -> None:
        if apply_update(self.router.load_view, update, self.router.index.has_worker):
            self._peer_updates += 1

    # ---------------------------------------------------------------- frontend listener

    def worker_added(self, worker_id: str, info) -> None:
        """Register a worker from its Info, in its role's pool; ValueError (worker refused) on
        a block size or hash seed other than the router's."""
        self.disagg.add_worker(worker_info(worker_id, info), worker_role(info))
        if self._feed is not None:
            self._feed.catch_up(worker_id)

    def worker_removed(self, worker_id: str) -> None:
        self.disagg.remove_worker(worker_id)
        if self._feed is not None:
            self._feed.forget(worker_id)

    def first_token(self, route_id: str) -> None:
        if self.disagg.in_flight(route_id):
            self._publish(self.disagg.on_first_token(route_id))
        elif self.router.on_prefill_done(route_id) and self._share:
            self._peers.publish(InflightKind.PREFILL_DONE, route_id)  # type: ignore[union-attr]

    def finished(self, route_id: str) -> None:
        if self.disagg.in_flight(route_id):
            self._publish(self.disagg.on_finished(route_id))
        elif self.router.on_finished(route_id) and self._share:
            self._peers.publish(InflightKind.FINISHED, route_id)  # type: ignore[union-attr]

    # ---------------------------------------------------------------- disaggregated planner

    def plan_disagg(self, request: FrontendRouteRequest, prefill_candidates: tuple[str, ...]
                    ) -> DisaggPlan:
        """The frontend's DisaggPlanner (see the module docstring); never raises for a
        well-formed request."""
        rid = request.request_id
        if not self.disagg.in_flight(rid) and self.router.load_view.is_in_flight(rid):
            self.finished(rid)  # an aggregated attempt before (a pool that changed roles)
        req = RouterRouteRequest.from_tokens(rid, request.prompt_token_ids)
        routed = self.disagg.route(req, request.candidates, prefill_candidates)
        if routed is None:  # no candidate is registered with the router (not in practice)
            self._fallbacks += 1
            worker_id = request.candidates[self._turn % len(request.candidates)]
            self._turn += 1
            return DisaggPlan(worker_id, None, DisaggReason.NO_PREFILL_WORKER)
        decision, changes = routed
        self._publish(changes)
        return DisaggPlan(decision.decode_worker, decision.prefill_worker, decision.reason)

    def decode_started(self, route_id: str) -> None:
        self._publish(self.disagg.on_decode_started(route_id))

    def prefill_failed(self, route_id: str) -> None:
        self._publish(self.disagg.on_prefill_failed(route_id))

    def _publish(self, changes: list[LoadChange]) -> None:
        if self._share:
            for c in changes:
                self._peers.publish(InflightKind(c.kind), c.key, c.worker_id,  # type: ignore[union-attr]
                                    c.prefill_blocks, c.decode_blocks)

    # ---------------------------------------------------------------- picking

    def pick(self, request: FrontendRouteRequest) -> str:
        """The frontend's worker picker (see the module docstring); never raises for a
        well-formed request: a worker among ``request.candidates``."""
        rid = request.request_id
        candidates = request.candidates
        router = self.router
        if router.load_view.is_in_flight(rid):  # a retry: the earlier attempt is over
            self.finished(rid)
        req = RouterRouteRequest.from_tokens(rid, request.prompt_token_ids)
        decision = router.route(req) if router.workers else None
        if decision is not None and decision.worker_id in candidates:
            worker_id, prefill_blocks = decision.worker_id, decision.cost.uncached_blocks
        else:
            if decision is not None:
                router.on_finished(rid)  # undo its entry: the request goes elsewhere
            worker_id, prefill_blocks = self._fallback(req, candidates, decision)
            if prefill_blocks is None:
                return worker_id
        decode_blocks = -(-req.prompt_len // router.block_size)
        if self._share:
            self._peers.publish(InflightKind.ROUTED, rid, worker_id,  # type: ignore[union-attr]
                                prefill_blocks, decode_blocks)
        return worker_id

    def _fallback(self, req: RouterRouteRequest, candidates: tuple[str, ...], decision
                  ) -> tuple[str, int | None]:
        """The lowest-cost candidate the router knows (recorded in flight), else the next
        candidate in turn (not recorded: the router does not know it)."""
        self._fallbacks += 1
        router = self.router
        known = [w for w in candidates if router.index.has_worker(w)]
        if not known:
            worker_id = candidates[self._turn % len(candidates)]
            self._turn += 1
            return worker_id, None
        hashes = decision.block_hashes if decision is not None else \
            tuple(hash_blocks(req.token_ids, router.hash_config))  # type: ignore[arg-type]
        bs = router.block_size
        prompt_blocks = -(-req.prompt_len // bs)
        overlaps = router.index.overlap(hashes)
        load = router.load_view
        chosen = choose_worker(prompt_blocks, overlaps.scores, [load.load(w) for w in known],
                               router.cost_config, self._rng).chosen
        load.on_routed(chosen.worker_id, req.request_id, chosen.uncached_blocks, prompt_blocks)
        return chosen.worker_id, chosen.uncached_blocks

    # ---------------------------------------------------------------- state

    def stats(self) -> RoutingStats:
        feed = self._feed
        mine, split = self.router.stats(), self.disagg.stats()
        two = split.routing  # requests planned by the disaggregated router
        routing = RouterStats(mine.requests + two.requests, mine.prompt_blocks + two.prompt_blocks,
                              mine.hit_blocks + two.hit_blocks,
                              mine.achievable_hit_blocks + two.achievable_hit_blocks)
        return RoutingStats(
            router=routing, workers=len(self.router.workers),
            kv_batches_applied=feed.applied if feed else 0, gaps=feed.gaps if feed else 0,
            repairs=feed.repairs if feed else 0, resyncs=feed.resyncs if feed else 0,
            peer_updates=self._peer_updates, fallbacks=self._fallbacks,
            disagg_decisions={r.value: n for r, n in split.decisions.items()})


__all__ = ["RoutingService", "RoutingStats", "worker_info", "worker_role"]
