"""The router: worker registry, prefix index, load view and policy behind one interface.

Protocol (what its caller does; the router itself does no I/O and starts no thread):

- :meth:`Router.add_worker` when a worker registers (a different block size or hash seed is
  refused: its hashes would never match), :meth:`~Router.remove_worker` when it leaves.
- :meth:`~Router.apply_events` for each KV event batch of a worker, in its seq order; on a gap
  the caller replays the missing batches or loads a snapshot (:meth:`~Router.load_snapshot`),
  then applies the batch again (see :mod:`router.index`).
- :meth:`~Router.apply_load` for each load report.
- :meth:`~Router.route` for each request, then :meth:`~Router.on_prefill_done` and
  :meth:`~Router.on_finished` as it progresses (see :mod:`router.load`). ``route`` returns
  None when no worker is registered.

Modes (:func:`make_router`): ``kv`` scores workers on the overlap the events report; ``approx``
on the overlap predicted from its own past decisions (:mod:`router.approx`; it takes no
events); both then apply :func:`router.cost.choose_worker`. ``round_robin`` and ``random``
ignore overlap and load (baselines); they still take events, so that their decisions report
real overlaps. Every mode keeps the in-flight accounting and the stats.

Stats: per routed request, the overlap on the chosen worker (as the router knows it: from
events, or predicted in ``approx``) against the best an infinite cache shared by all workers
would give: the leading blocks of the prompt that any earlier request routed already had.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

from kvcache.events import BlockStored, KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from router.approx import ApproxCaches
from router.cost import CostConfig, choose_worker, worker_cost
from router.index import PrefixIndex
from router.load import LoadView
from router.types import (
    ApplyResult,
    LoadReport,
    OverlapScores,
    RouteDecision,
    RouteRequest,
    RouterMode,
    RouterStats,
    WorkerCost,
    WorkerInfo,
    WorkerSnapshot,
)


class Router:
    """Routes requests to workers; subclasses differ only in how they pick (``_pick``)."""

    mode: RouterMode

    def __init__(self, hash_config: BlockHashConfig, cost_config: CostConfig | None = None, *,
                 seed: int = 0, clock: Callable[[], float] = time.monotonic,
                 load_grace_s: float = 0.0, track_achievable: bool = True) -> None:
        if not isinstance(hash_config, BlockHashConfig):
            raise TypeError(f"hash_config must be a BlockHashConfig, got {type(hash_config)}")
        cost_config = CostConfig() if cost_config is None else cost_config
        if not isinstance(cost_config, CostConfig):
            raise TypeError(f"cost_config must be a CostConfig, got {type(cost_config)}")
        self.hash_config = hash_config
        self.cost_config = cost_config
        self.block_size = hash_config.block_size
        self._clock = clock
        self._rng = random.Random(seed)
        self._index = PrefixIndex()
        self._load = LoadView(hash_config.block_size, clock, load_grace_s)
        self._workers: dict[str, WorkerInfo] = {}
        self._track_achievable = track_achievable
        self._seen: set[int] = set()  # every block hash routed so far
        self._requests = self._prompt_blocks = self._hit_blocks = self._achievable = 0

    # ---------------------------------------------------------------- workers

    def add_worker(self, info: WorkerInfo) -> None:
        if not isinstance(info, WorkerInfo):
            raise TypeError(f"add_worker takes a WorkerInfo, got {type(info).__name__}")
        self.hash_config.check_compatible(info.hash_config, who=f"worker {info.worker_id!r}")
        if info.worker_id in self._workers:
            raise ValueError(f"worker {info.worker_id!r} is already registered; remove_worker "
                             "it first (a restarted worker starts with an empty cache)")
        self._workers[info.worker_id] = info
        self._index.add_worker(info.worker_id)
        self._load.add_worker(info.worker_id, info.capacity_blocks)

    def remove_worker(self, worker_id: str) -> bool:
        """Forget the worker, its blocks and its in-flight requests; False if unknown."""
        if self._workers.pop(worker_id, None) is None:
            return False
        self._index.remove_worker(worker_id)
        self._load.remove_worker(worker_id)
        return True

    @property
    def workers(self) -> tuple[str, ...]:
        """Registered worker ids, in registration order."""
        return tuple(self._workers)

    @property
    def index(self) -> PrefixIndex:
        return self._index

    @property
    def load_view(self) -> LoadView:
        return self._load

    # ---------------------------------------------------------------- feeds

    def apply_events(self, worker_id: str, batch: KvEventBatch) -> ApplyResult:
        return self._index.apply(worker_id, batch)

    def snapshot(self, worker_id: str) -> WorkerSnapshot:
        return self._index.snapshot(worker_id)

    def load_snapshot(self, worker_id: str, stored: Iterable[BlockStored], seq: int) -> None:
        self._index.load_snapshot(worker_id, stored, seq)

    def apply_load(self, report: LoadReport) -> bool:
        """False (ignored) for an unknown worker or a report older than its latest."""
        return self._load.apply_report(report)

    def on_prefill_done(self, request_id: str) -> bool:
        return self._load.on_prefill_done(request_id)

    def on_finished(self, request_id: str) -> bool:
        return self._load.on_finished(request_id)

    # ---------------------------------------------------------------- routing

    def route(self, request: RouteRequest) -> RouteDecision | None:
        """Pick a worker for ``request``; None when no worker is registered."""
        if not self._workers:
            return None
        if self._load.is_in_flight(request.request_id):
            raise ValueError(f"request {request.request_id!r} is already in flight; call "
                             "on_finished first or use a new id")
        hashes = self._block_hashes(request)
        bs = self.block_size
        prompt_blocks = -(-request.prompt_len // bs)
        overlaps = self._overlaps(hashes)
        cost = self._pick(prompt_blocks, overlaps)
        worker_id = cost.worker_id
        self._after_pick(worker_id, hashes)
        decode_blocks = -(-(request.prompt_len + request.expected_output_tokens) // bs)
        self._load.on_routed(worker_id, request.request_id, cost.uncached_blocks, decode_blocks)
        self._requests += 1
        self._prompt_blocks += len(hashes)
        self._hit_blocks += cost.overlap_blocks
        if self._track_achievable:
            # Every routed prompt adds all its blocks, and block i's hash pins the tokens of
            # blocks 0..i: the blocks already seen form a leading run, found by bisection.
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
        return RouteDecision(request.request_id, worker_id, self.mode, cost.overlap_blocks,
                             len(hashes), cost, hashes)

    def stats(self) -> RouterStats:
        return RouterStats(self._requests, self._prompt_blocks, self._hit_blocks,
                           self._achievable)

    # ---------------------------------------------------------------- policy hooks

    def _overlaps(self, hashes: tuple[int, ...]) -> OverlapScores:
        return self._index.overlap(hashes)

    def _pick(self, prompt_blocks: int, overlaps: OverlapScores) -> WorkerCost:
        raise NotImplementedError

    def _after_pick(self, worker_id: str, hashes: tuple[int, ...]) -> None:
        pass

    def _block_hashes(self, request: RouteRequest) -> tuple[int, ...]:
        full = request.prompt_len // self.block_size
        if request.block_hashes is not None:
            if len(request.block_hashes) != full:
                raise ValueError(
                    f"request {request.request_id!r}: {len(request.block_hashes)} block hashes "
                    f"for prompt_len={request.prompt_len} at block_size={self.block_size}; "
                    f"expected {full} (hash_blocks of the prompt with the router's config)"
                )
            return tuple(request.block_hashes)
        return tuple(hash_blocks(request.token_ids, self.hash_config))  # type: ignore[arg-type]

    def _cost_of(self, worker_id: str, prompt_blocks: int, overlaps: OverlapScores
                 ) -> WorkerCost:
        return worker_cost(prompt_blocks, overlaps.get(worker_id), self._load.load(worker_id),
                           self.cost_config)


class KvRouter(Router):
    """Lowest cost on the overlap the workers' KV events report."""

    mode = RouterMode.KV

    def _pick(self, prompt_blocks: int, overlaps: OverlapScores) -> WorkerCost:
        return choose_worker(prompt_blocks, overlaps.scores, self._load.loads(),
                             self.cost_config, self._rng).chosen


class ApproxRouter(KvRouter):
    """Lowest cost on the overlap predicted from its own decisions (no KV events)."""

    mode = RouterMode.APPROX

    def __init__(self, hash_config: BlockHashConfig, cost_config: CostConfig | None = None, *,
                 approx_ttl_s: float = 120.0, **kwargs) -> None:
        super().__init__(hash_config, cost_config, **kwargs)
        self._approx = ApproxCaches(self._index, approx_ttl_s)

    def add_worker(self, info: WorkerInfo) -> None:
        super().add_worker(info)
        self._approx.add_worker(info.worker_id)

    def remove_worker(self, worker_id: str) -> bool:
        self._approx.remove_worker(worker_id)
        return super().remove_worker(worker_id)

    def apply_events(self, worker_id: str, batch: KvEventBatch) -> ApplyResult:
        raise ValueError("the approx router predicts caches from its own decisions and takes "
                         "no KV events; use mode 'kv' to route on events")

    def load_snapshot(self, worker_id: str, stored: Iterable[BlockStored], seq: int) -> None:
        raise ValueError("the approx router takes no snapshots; use mode 'kv'")

    def _overlaps(self, hashes: tuple[int, ...]) -> OverlapScores:
        self._approx.expire(self._clock())
        return self._index.overlap(hashes)

    def _after_pick(self, worker_id: str, hashes: tuple[int, ...]) -> None:
        self._approx.record(worker_id, hashes, self._clock())


class RoundRobinRouter(Router):
    """Each registered worker in turn (registration order), whatever its load or cache."""

    mode = RouterMode.ROUND_ROBIN

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._turn = 0

    def _pick(self, prompt_blocks: int, overlaps: OverlapScores) -> WorkerCost:
        workers = list(self._workers)
        worker_id = workers[self._turn % len(workers)]
        self._turn += 1
        return self._cost_of(worker_id, prompt_blocks, overlaps)


class RandomRouter(Router):
    """A uniformly random registered worker (the seeded rng), whatever its load or cache."""

    mode = RouterMode.RANDOM

    def _pick(self, prompt_blocks: int, overlaps: OverlapScores) -> WorkerCost:
        return self._cost_of(self._rng.choice(list(self._workers)), prompt_blocks, overlaps)


_ROUTERS: dict[RouterMode, type[Router]] = {
    RouterMode.KV: KvRouter,
    RouterMode.APPROX: ApproxRouter,
    RouterMode.ROUND_ROBIN: RoundRobinRouter,
    RouterMode.RANDOM: RandomRouter,
}


def make_router(mode: RouterMode | str, hash_config: BlockHashConfig,
                cost_config: CostConfig | None = None, seed: int = 0,
                clock: Callable[[], float] = time.monotonic, *, approx_ttl_s: float = 120.0,
                load_grace_s: float = 0.0, track_achievable: bool = True) -> Router:
    """A router of ``mode`` (``kv``, ``approx``, ``round_robin``, ``random``).

    ``seed`` drives tie-breaks and random picks; ``clock`` (seconds, never going back) stamps
    routing and load reports, and expires ``approx`` predictions after ``approx_ttl_s``;
    ``load_grace_s`` is how long a report may lag a routed request (see :mod:`router.load`);
    ``track_achievable`` keeps the set of every block hash routed, for :meth:`Router.stats`
    (it grows without bound: turn it off in long-running services that do not need it).
    """
    try:
        m = RouterMode(mode)
    except ValueError:
        raise ValueError(f"unknown router mode {mode!r}; choose one of "
                         f"{', '.join(x.value for x in RouterMode)}") from None
    if m is RouterMode.APPROX:
        return ApproxRouter(hash_config, cost_config, approx_ttl_s=approx_ttl_s, seed=seed,
                            clock=clock, load_grace_s=load_grace_s,
                            track_achievable=track_achievable)
    return _ROUTERS[m](hash_config, cost_config, seed=seed, clock=clock,
                       load_grace_s=load_grace_s, track_achievable=track_achievable)
