"""The virtual-clock event loop the offline replays share: :class:`SimReplay`, the base of
:class:`~orchestrator.replay.simulator.OfflineReplay` (aggregated workers) and
:class:`~orchestrator.replay.disagg.DisaggReplay` (prefill and decode workers).

What it owns: the trace in replay order (:func:`~orchestrator.replay.trace_file.
replay_order`), the router on the virtual clock, the workers
(:class:`~orchestrator.replay.sim_workers.SimWorker`), the oracle, the tally, and a heap of
timed events ``(t, kind, seq, payload)``: kind :data:`STEP` is a worker's step completing
(``seq`` the worker's index, ``payload`` its id); a replay may add kinds of its own after it
(:meth:`SimReplay._event` handles them). At one instant: the due events in heap order (kind,
then seq), then the arrivals (trace order), then every idle worker with unfinished requests
starts a step (worker order).

What a replay gives it (the hooks): :meth:`_arrive` (trace request ``k`` at ``t``: route it
and queue it), :meth:`_complete` (worker ``w``'s step completed at ``t``), :meth:`_event`
(its own kinds), :meth:`_check_end` (after the loop) and :meth:`_report`. Helpers for them:
:meth:`_prompt` (a request's token ids, block hashes and oracle hits) and :meth:`_tokens`
(TTFT and inter-token gaps as tokens come).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import ClassVar

from kvcache.events import KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.oracle import OracleCache
from orchestrator.replay.report import ReplayReport, Tally
from orchestrator.replay.sim_workers import SimWorker, make_worker
from orchestrator.replay.trace_file import replay_order
from router.router import Router, make_router
from router.trace import TraceRequest, trace_token_ids
from router.types import RouteRequest

STEP = 0  # heap event kind: a worker's step completes


class SimRequest:
    """A replayed request's token times: ``first`` (None until its first token), ``last`` and
    ``num_out`` (what :meth:`SimReplay._tokens` keeps)."""

    __slots__ = ("arrival", "first", "last", "num_out", "oracle_blocks", "output_len", "rid")

    def __init__(self, rid: str, arrival: float, output_len: int, oracle_blocks: int) -> None:
        self.rid = rid
        self.arrival = arrival
        self.output_len = output_len
        self.oracle_blocks = oracle_blocks
        self.first: float | None = None
        self.last = 0.0
        self.num_out = 0


class SimReplay:
    """One offline replay of ``requests`` under ``config`` (see the module docstring);
    :meth:`run` once. Subclasses set :attr:`disaggregated` and :attr:`wrong_config` (the
    error for a config of the other kind) and add their workers with :meth:`_add_worker`."""

    disaggregated: ClassVar[bool]
    wrong_config: ClassVar[str]

    def __init__(self, config: ReplayConfig, requests: Sequence[TraceRequest]) -> None:
        if not isinstance(config, ReplayConfig):
            raise TypeError(f"config must be a ReplayConfig, got {type(config).__name__}")
        if config.disaggregated is not self.disaggregated:
            raise ValueError(self.wrong_config)
        if not requests:
            raise ValueError("nothing to replay: the trace holds no requests")
        self.config = config
        self._trace = replay_order(requests, config.limit)
        self._hash_config = BlockHashConfig(config.block_size, config.hash_seed)
        self._now = 0.0
        self.router: Router = make_router(config.router, self._hash_config, config.cost_config,
                                          seed=config.seed, clock=self._clock)
        self.workers: dict[str, SimWorker] = {}
        self._per_worker: dict[str, int] = {}  # requests each worker got
        self._oracle = OracleCache(config.block_size)
        self._tally = Tally()
        self._heap: list[tuple[float, int, int, object]] = []
        self._events_on = True  # whether the router takes the workers' KV events
        self._ran = False

    def _clock(self) -> float:
        return self._now

    def _add_worker(self, worker_id: str) -> SimWorker:
        w = make_worker(self.config, len(self.workers), worker_id)
        self.workers[worker_id] = w
        self._per_worker[worker_id] = 0
        return w

    # ---------------------------------------------------------------- the loop

    def run(self) -> ReplayReport:
        if self._ran:
            raise RuntimeError(f"a {type(self).__name__} runs once; build a new one to replay "
                               "again")
        self._ran = True
        wall0 = time.perf_counter()
        speedup = self.config.speedup
        arrivals = [tr.timestamp_ms / 1000.0 / speedup for tr in self._trace]
        n = len(arrivals)
        heap = self._heap
        ai = 0
        workers = list(self.workers.values())
        while ai < n or heap:
            t = heap[0][0] if heap else arrivals[ai]
            if ai < n and arrivals[ai] < t:
                t = arrivals[ai]
            self._now = t
            while heap and heap[0][0] <= t:
                _, kind, _, payload = heapq.heappop(heap)
                if kind == STEP:
                    self._complete(self.workers[payload], t)  # type: ignore[index]
                else:
                    self._event(kind, payload, t)
            while ai < n and arrivals[ai] <= t:
                self._arrive(ai, arrivals[ai])
                ai += 1
            for w in workers:
                if not w.busy and w.engine.has_unfinished():
                    heapq.heappush(heap, (w.start_step(t), STEP, w.index, w.worker_id))
        self._check_end()
        return self._report(time.perf_counter() - wall0)

    # ---------------------------------------------------------------- hooks

    def _arrive(self, k: int, t: float) -> None:
        raise NotImplementedError

    def _complete(self, w: SimWorker, t: float) -> None:
        raise NotImplementedError

    def _event(self, kind: int, payload: object, t: float) -> None:
        raise RuntimeError(f"{type(self).__name__} has no events of kind {kind}")

    def _check_end(self) -> None:
        """After the last event (nothing by default)."""

    def _report(self, wall_s: float) -> ReplayReport:
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers

    def _prompt(self, k: int, t: float) -> tuple[RouteRequest, tuple[int, ...], int]:
        """Trace request ``k`` arriving at ``t``: what the router is told (the prompt only, no
        output length: the live frontend's router does not know it either), its token ids and
        the blocks the oracle had of it."""
        tokens = tuple(trace_token_ids(self._trace[k], self.config.vocab_size))
        hashes = tuple(hash_blocks(tokens, self._hash_config))
        oracle_blocks = self._oracle.add(hashes, len(tokens))
        self._tally.arrived(t)
        return RouteRequest(f"req-{k}", len(tokens), None, hashes), tokens, oracle_blocks

    def _tokens(self, req: SimRequest, t: float, n: int) -> bool:
        """``n`` > 0 tokens of ``req`` at ``t`` (tokens of one step arrive together: gaps of
        0 after the first of them); True when they are its first."""
        tally = self._tally
        first = req.first is None
        if first:
            req.first = t
            tally.ttft.append(t - req.arrival)
        else:
            tally.itl.append(t - req.last)
        if n > 1:
            tally.itl.extend([0.0] * (n - 1))
        req.last = t
        req.num_out += n
        return first

    def _apply_events(self, w: SimWorker, kv_events: KvEventBatch | None) -> None:
        """A completed step's KV events to the router, when it takes them (``_events_on``)."""
        if kv_events is not None and self._events_on:
            applied = self.router.apply_events(w.worker_id, kv_events)
            if not applied.ok:
                raise RuntimeError(f"router refused {w.worker_id}'s KV events: {applied!r}")

    def _preemptions(self) -> int:
        return sum(w.engine.scheduler.num_preemptions for w in self.workers.values())


__all__ = ["STEP", "SimReplay", "SimRequest"]
