"""Disaggregated routing: which decode worker takes a request, whether its prompt is prefilled
remotely (on a prefill worker) or locally (on the decode worker), and on which prefill worker.

Pools (:class:`~router.disagg_plan.PoolRole`): the decode pool is the ``decode`` and ``both``
workers, the prefill pool the ``prefill`` workers. All of them share one
:class:`~router.router.Router`: one prefix index (KV events of every worker: a decode worker's
pulled blocks enter its cache and its events, so the next turn of a conversation finds them),
one load view.

The decision, for a prompt of ``prompt_len`` tokens (``prompt_blocks = ceil(prompt_len /
block_size)``; :func:`~router.disagg_plan.plan_prefill` is the pure core, :class:`DisaggRouter`
applies it):

1. Decode worker: the lowest :func:`router.cost.choose_worker` cost over the decode pool with
   the router's :class:`~router.cost.CostConfig`: uncached prompt blocks on it (what it would
   compute, or pull) plus its queued prefill, against its decode blocks: "decode load and what
   it already holds". ``round_robin`` / ``random`` routers take the next (a random) decode
   worker instead.
2. Local or remote: :func:`~router.disagg_plan.plan_prefill` (reasons
   :class:`~router.disagg_plan.DisaggReason`; the rules are in :mod:`router.disagg_plan`): local
   when there is no prefill worker, when the uncached part on the decode worker is short, or
   when the prefill pool is busy; otherwise remote.
3. Prefill worker (remote only): the lowest cost over the prefill pool with the router's cost
   config but ``decode_weight = 0`` (a prefill worker does not decode): uncached blocks on it
   plus its queued prefill, "cached prefix on it and its prefill load". ``round_robin`` /
   ``random``: the next (a random) prefill worker.

``prefill_failed`` is not decided here: the frontend reports it (:meth:`DisaggRouter.
on_prefill_failed`) when the prefill worker failed and the decode worker prefills locally.

In-flight accounting (:mod:`router.load`), per request id ``rid``:

==========================  ==============================================================
event                       entries
==========================  ==============================================================
routed, local               ``rid`` on the decode worker: its uncached blocks to prefill,
                            ``ceil((prompt_len + expected_output) / block_size)`` to hold
routed, remote              ``rid + PREFILL_KEY_SUFFIX`` on the prefill worker (uncached
                            blocks on it to prefill, the prompt's blocks held pinned) and
                            ``rid`` on the decode worker (nothing to prefill, blocks to hold)
:meth:`on_first_token`      the entry that prefills (prefill worker's when remote) is done
:meth:`on_decode_started`   remote: the decode worker produced tokens (so it pulled and
                            released the handle): its entry's prefill is done, the prefill
                            entry is finished
:meth:`on_prefill_failed`   remote: the prefill entry is finished; the decode entry is
                            recorded again with the decode worker's uncached blocks to prefill
:meth:`on_finished`         every entry of the request is finished
==========================  ==============================================================

Each of these returns the :class:`LoadChange` list it made, so that a caller sharing in-flight
load with other router replicas can send the same changes (the kinds are those of
``orchestrator.routing.inflight``). A request routed again under the same id (a retry) first
finishes its earlier entries.

Pure: no I/O, no threads, no clock of its own (the router's clock stamps entries); the same
calls in the same order give the same decisions.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvcache.hashing import hash_blocks
from router.approx import ApproxCaches
from router.cost import CostConfig, choose_worker, worker_cost
from router.disagg_plan import DisaggConfig, DisaggReason, PoolRole, PrefillPlan, plan_prefill
from router.router import Router
from router.types import RouteRequest, RouterMode, RouterStats, WorkerCost, WorkerInfo, WorkerLoad

PREFILL_KEY_SUFFIX = "#prefill"  # in-flight key of a request's prefill-worker entry


@dataclass(frozen=True)
class DisaggDecision:
    request_id: str
    decode: WorkerCost  # the decode worker's breakdown (router.cost)
    prefill: WorkerCost | None  # the prefill worker's (cost without decode), None: local
    plan: PrefillPlan
    block_hashes: tuple[int, ...]

    @property
    def decode_worker(self) -> str:
        return self.decode.worker_id

    @property
    def prefill_worker(self) -> str | None:
        return None if self.prefill is None else self.prefill.worker_id

    @property
    def reason(self) -> DisaggReason:
        return self.plan.reason


@dataclass(frozen=True)
class LoadChange:
    """One in-flight change (kinds as ``orchestrator.routing.inflight.InflightKind``)."""

    kind: str  # "routed", "prefill_done" or "finished"
    key: str
    worker_id: str = ""  # routed only
    prefill_blocks: int = 0  # routed only
    decode_blocks: int = 0  # routed only


@dataclass(frozen=True)
class DisaggStats:
    routing: RouterStats  # hits: blocks the worker that prefills held (as the router knew)
    decisions: Mapping[DisaggReason, int]  # decisions by reason, fallbacks included


class _Flight:
    __slots__ = ("decode", "decode_blocks", "local_prefill_blocks", "prefill", "started")

    def __init__(self, decode: str, prefill: str | None, local_prefill_blocks: int,
                 decode_blocks: int) -> None:
        self.decode = decode
        self.prefill = prefill  # None once local (from the start, or after a fallback)
        self.local_prefill_blocks = local_prefill_blocks  # uncached blocks on the decode worker
        self.decode_blocks = decode_blocks
        self.started = False  # the decode worker produced tokens (remote)


class DisaggRouter:
    """Routes over a prefill pool and a decode pool sharing ``router``'s index and load view
    (see the module docstring). Register workers here (:meth:`add_worker`), not on the router.

    ``clock`` and ``approx_ttl_s``: for an ``approx`` router (give the router's clock), how
    long a predicted cache lasts (this class records its own predictions in the router's
    index). ``seed``: tie-breaks and random picks."""

    def __init__(self, router: Router, config: DisaggConfig | None = None, *, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic, approx_ttl_s: float = 120.0,
                 track_achievable: bool = True) -> None:
        if not isinstance(router, Router):
            raise TypeError(f"router must be a router.Router, got {type(router).__name__}")
        config = DisaggConfig() if config is None else config
        if not isinstance(config, DisaggConfig):
            raise TypeError(f"config must be a DisaggConfig, got {type(config).__name__}")
        self.router = router
        self.config = config
        self._prefill_cost = dataclasses.replace(router.cost_config, decode_weight=0.0)
        self._rng = random.Random(seed)
        self._clock = clock
        self._approx = ApproxCaches(router.index, approx_ttl_s) \
            if router.mode is RouterMode.APPROX else None
        self._roles: dict[str, PoolRole] = {}
        self._flights: dict[str, _Flight] = {}
        self._turns = {True: 0, False: 0}  # round robin: next decode (True) / prefill index
        self._track = track_achievable
        self._seen: set[int] = set()
        self._requests = self._prompt_blocks = self._hits = self._achievable = 0
        self._decisions = dict.fromkeys(DisaggReason, 0)

    # ---------------------------------------------------------------- workers

    def add_worker(self, info: WorkerInfo, role: PoolRole | str) -> None:
        """Register a worker with the router (ValueError: refused, see Router.add_worker)."""
        try:
            role = PoolRole(role)
        except ValueError:
            raise ValueError(f"worker {info.worker_id!r}: unknown role {role!r}; use one of "
                             f"{[r.value for r in PoolRole]}") from None
        self.router.add_worker(info)
        self._roles[info.worker_id] = role
        if self._approx is not None:
            self._approx.add_worker(info.worker_id)

    def remove_worker(self, worker_id: str) -> bool:
        if self._roles.pop(worker_id, None) is None:
            return False
        if self._approx is not None:
            self._approx.remove_worker(worker_id)
        return self.router.remove_worker(worker_id)

    def role(self, worker_id: str) -> PoolRole | None:
        return self._roles.get(worker_id)

    def pool(self, decode: bool) -> tuple[str, ...]:
        """Registered decode-pool (``decode=True``) or prefill-pool workers, in order."""
        return tuple(w for w, r in self._roles.items() if r.decodes == decode)

    # ---------------------------------------------------------------- routing

    def route(self, request: RouteRequest, decode_candidates: Sequence[str] | None = None,
              prefill_candidates: Sequence[str] | None = None
              ) -> tuple[DisaggDecision, list[LoadChange]] | None:
        """Place ``request`` (see the module docstring); candidates: the workers that may be
        chosen in each pool (None: every registered one; unregistered ids and workers of the
        other pool are left out). None when no decode worker is left to choose from."""
        rid = request.request_id
        changes = self.on_finished(rid) if rid in self._flights else []
        decode_ids = self._candidates(True, decode_candidates)
        if not decode_ids:
            return None
        prefill_ids = self._candidates(False, prefill_candidates)
        router = self.router
        bs = router.block_size
        hashes = self._hashes(request)
        if self._approx is not None:
            self._approx.expire(self._clock())
        overlaps = router.index.overlap(hashes).scores
        prompt_blocks = -(-request.prompt_len // bs)
        load = router.load_view
        decode = self._choose(True, prompt_blocks, overlaps, [load.load(w) for w in decode_ids],
                              router.cost_config)
        prefill_loads = [load.load(w) for w in prefill_ids]
        plan = plan_prefill(request.prompt_len, bs, decode.overlap_blocks, prefill_loads,
                            router.cost_config, self.config)
        prefill = self._choose(False, prompt_blocks, overlaps, prefill_loads,
                               self._prefill_cost) if plan.remote else None
        decode_blocks = -(-(request.prompt_len + request.expected_output_tokens) // bs)
        flight = _Flight(decode.worker_id, None if prefill is None else prefill.worker_id,
                         decode.uncached_blocks, decode_blocks)
        self._flights[rid] = flight
        if prefill is None:
            changes.append(self._routed(decode.worker_id, rid, decode.uncached_blocks,
                                        decode_blocks))
        else:
            changes.append(self._routed(prefill.worker_id, rid + PREFILL_KEY_SUFFIX,
                                        prefill.uncached_blocks, prompt_blocks))
            changes.append(self._routed(decode.worker_id, rid, 0, decode_blocks))
        if self._approx is not None:
            now = self._clock()
            for worker in {decode.worker_id, flight.prefill} - {None}:
                self._approx.record(worker, hashes, now)
        self._count(plan.reason, hashes, decode if prefill is None else prefill)
        return DisaggDecision(rid, decode, prefill, plan, hashes), changes

    def on_first_token(self, request_id: str) -> list[LoadChange]:
        """The first token is known: the worker that prefilled is done prefilling."""
        f = self._flights.get(request_id)
        if f is None:
            return []
        key = request_id if f.prefill is None else request_id + PREFILL_KEY_SUFFIX
        return self._done(key)

    def on_decode_started(self, request_id: str) -> list[LoadChange]:
        """Remote: the decode worker produced its first tokens (it pulled the blocks and
        released the handle)."""
        f = self._flights.get(request_id)
        if f is None or f.prefill is None or f.started:
            return []
        f.started = True
        return self._done(request_id) + self._finish(request_id + PREFILL_KEY_SUFFIX)

    def on_prefill_failed(self, request_id: str) -> list[LoadChange]:
        """Remote: the prefill worker failed; the decode worker prefills locally now."""
        f = self._flights.get(request_id)
        if f is None or f.prefill is None:
            return []
        f.prefill = None
        changes = self._finish(request_id + PREFILL_KEY_SUFFIX) + self._finish(request_id)
        if f.decode in self._roles:
            changes.append(self._routed(f.decode, request_id, f.local_prefill_blocks,
                                        f.decode_blocks))
        self._decisions[DisaggReason.PREFILL_FAILED] += 1
        return changes

    def on_finished(self, request_id: str) -> list[LoadChange]:
        """The request ended (done, failed, cancelled): every entry of it is finished."""
        f = self._flights.pop(request_id, None)
        if f is None:
            return []
        changes = self._finish(request_id)
        if f.prefill is not None and not f.started:
            changes += self._finish(request_id + PREFILL_KEY_SUFFIX)
        return changes

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._flights

    def stats(self) -> DisaggStats:
        return DisaggStats(RouterStats(self._requests, self._prompt_blocks, self._hits,
                                       self._achievable), dict(self._decisions))

    # ---------------------------------------------------------------- internals

    def _candidates(self, decode: bool, given: Sequence[str] | None) -> list[str]:
        roles = self._roles
        if given is None:
            return [w for w, r in roles.items() if r.decodes == decode]
        return [w for w in given if (r := roles.get(w)) is not None and r.decodes == decode]

    def _hashes(self, request: RouteRequest) -> tuple[int, ...]:
        router = self.router
        full = request.prompt_len // router.block_size
        if request.block_hashes is not None:
            if len(request.block_hashes) != full:
                raise ValueError(f"request {request.request_id!r}: {len(request.block_hashes)} "
                                 f"block hashes for prompt_len={request.prompt_len} at "
                                 f"block_size={router.block_size}; expected {full}")
            return tuple(request.block_hashes)
        return tuple(hash_blocks(request.token_ids, router.hash_config))  # type: ignore[arg-type]

    def _choose(self, decode: bool, prompt_blocks: int, overlaps: Mapping[str, int],
                loads: list[WorkerLoad], cost: CostConfig) -> WorkerCost:
        mode = self.router.mode
        if mode is RouterMode.ROUND_ROBIN:
            ld = loads[self._turns[decode] % len(loads)]
            self._turns[decode] += 1
        elif mode is RouterMode.RANDOM:
            ld = self._rng.choice(loads)
        else:
            return choose_worker(prompt_blocks, overlaps, loads, cost, self._rng).chosen
        return worker_cost(prompt_blocks, overlaps.get(ld.worker_id, 0), ld, cost)

    def _routed(self, worker_id: str, key: str, prefill_blocks: int, decode_blocks: int
                ) -> LoadChange:
        self.router.load_view.on_routed(worker_id, key, prefill_blocks, decode_blocks)
        return LoadChange("routed", key, worker_id, prefill_blocks, decode_blocks)

    def _done(self, key: str) -> list[LoadChange]:
        return [LoadChange("prefill_done", key)] if self.router.on_prefill_done(key) else []

    def _finish(self, key: str) -> list[LoadChange]:
        return [LoadChange("finished", key)] if self.router.on_finished(key) else []

    def _count(self, reason: DisaggReason, hashes: tuple[int, ...], prefiller: WorkerCost
               ) -> None:
        self._decisions[reason] += 1
        self._requests += 1
        self._prompt_blocks += len(hashes)
        self._hits += min(prefiller.overlap_blocks, len(hashes))
        if self._track:  # the leading run of blocks routed before (see Router.route)
            seen = self._seen
            lo, hi = 0, len(hashes)
            while lo < hi:
                mid = (lo + hi) >> 1
                if hashes[mid] in seen:
                    lo = mid + 1
                else:
                    hi = mid
            self._achievable += lo
            seen.update(hashes[lo:])


__all__ = [
    "PREFILL_KEY_SUFFIX",
    "DisaggConfig",
    "DisaggDecision",
    "DisaggReason",
    "DisaggRouter",
    "DisaggStats",
    "LoadChange",
    "PoolRole",
    "PrefillPlan",
    "plan_prefill",
]
