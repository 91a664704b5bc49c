"""Offline trace replay: the real router, schedulers and block pools of N mocker workers in one
process, on one virtual clock (a discrete-event simulation; hours of traffic in minutes).

Each worker is an :class:`~workers.engine.engine.LLMEngine` over a
:class:`~workers.mocker.runner.MockerRunner` with its own
:class:`~workers.mocker.clock.VirtualClock`; prefix caching is on and the block hashes use
the router's seed and block size. The engines have no tokenizer, hence no EOS: every request
runs to ``max_tokens = output_length`` (at least 1: a request always yields its first token).
Each worker is a :class:`~orchestrator.replay.sim_workers.SimWorker`; a disaggregated config
(prefill and decode workers) is replayed by :mod:`orchestrator.replay.disagg` instead
(:func:`replay_offline` picks it).

Events, in virtual time ``t`` (seconds), kept in a heap of step completions plus the sorted
arrivals:

- arrival of trace request ``k`` at ``timestamp_ms / 1000 / speedup``: its prompt token ids
  (:func:`router.trace.trace_token_ids`) are hashed once (:func:`kvcache.hashing.hash_blocks`)
  for the router and the oracle, the router picks a worker (``route`` at time ``t``, told the
  prompt only, as in the live frontend) and the worker's engine queues the request (arrival
  time ``t``).
- an idle worker with unfinished requests starts a step at ``t``: its clock jumps to ``t``,
  ``engine.step()`` schedules and runs the batch, and the mocker's modelled duration ``d``
  puts the step's completion at ``t + d``. The worker is busy until then; requests routed to
  it meanwhile wait for its next step (as with a live engine, which takes new requests
  between steps).
- completion of a worker's step at ``t + d``: its outputs are emitted at that time (a
  request's first token time is the completion time of the step that sampled it, its later
  tokens give the inter-token gaps); its KV event batch goes to the router
  (``apply_events``; not in ``approx`` mode, which takes none), then a load report of the
  engine as it is now (``apply_load``, built like a live worker's:
  :func:`workers.server.worker.build_load_report`); a first token calls ``on_prefill_done``,
  a finished request ``on_finished``. The worker then starts its next step at ``t + d`` if
  it has work.

Events at the same instant: step completions first (worker order), then arrivals (trace
order), then idle workers with work start steps. The router's clock is the virtual clock, so
its load-report covering rule (:mod:`router.load`) works in virtual time (grace 0: a report
counts every request routed before it).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

import numpy as np

from kvcache.hashing import BlockHashConfig, hash_blocks
from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.oracle import OracleCache
from orchestrator.replay.report import LatencySummary, ReplayReport, RouterSummary
from orchestrator.replay.sim_workers import SimWorker, Tally, make_worker, share
from router.router import Router, make_router
from router.trace import TraceRequest, trace_token_ids
from router.types import RouteRequest, RouterMode, WorkerInfo
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)


class _Req:
    __slots__ = ("arrival", "first", "last", "num_out", "oracle_blocks", "output_len",
                 "prompt_len", "worker_id")

    def __init__(self, arrival: float, prompt_len: int, output_len: int, worker_id: str,
                 oracle_blocks: int) -> None:
        self.arrival = arrival
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.worker_id = worker_id
        self.oracle_blocks = oracle_blocks
        self.first: float | None = None
        self.last = 0.0
        self.num_out = 0


class OfflineReplay:
    """One replay of ``requests`` under ``config`` (see the module docstring); :meth:`run` once."""

    def __init__(self, config: ReplayConfig, requests: Sequence[TraceRequest]) -> None:
        if not isinstance(config, ReplayConfig):
            raise TypeError(f"config must be a ReplayConfig, got {type(config).__name__}")
        if config.disaggregated:
            raise ValueError("this config is disaggregated: replay it with "
                             "orchestrator.replay.disagg.DisaggReplay (replay_offline picks it)")
        if not requests:
            raise ValueError("nothing to replay: the trace holds no requests")
        self.config = config
        reqs = list(requests)[: config.limit] if config.limit is not None else list(requests)
        order = sorted(range(len(reqs)), key=lambda i: (reqs[i].timestamp_ms, i))
        self._trace = [reqs[i] for i in order]
        self._hash_config = BlockHashConfig(config.block_size, config.hash_seed)
        self._now = 0.0
        self.router: Router = make_router(config.router, self._hash_config, config.cost_config,
                                          seed=config.seed, clock=self._clock)
        self._events_on = self.router.mode is not RouterMode.APPROX
        self.workers: dict[str, SimWorker] = {}
        for i in range(config.workers):
            w = make_worker(config, i, f"worker-{i}")
            self.workers[w.worker_id] = w
            self.router.add_worker(WorkerInfo(w.worker_id, self._hash_config, config.num_blocks))
        self._oracle = OracleCache(config.block_size)
        self._reqs: dict[str, _Req] = {}
        self._tally = Tally()
        self._per_worker = dict.fromkeys(self.workers, 0)
        self._ran = False

    def _clock(self) -> float:
        return self._now

    # ---------------------------------------------------------------- the loop

    def run(self) -> ReplayReport:
        if self._ran:
            raise RuntimeError("an OfflineReplay runs once; build a new one to replay again")
        self._ran = True
        wall0 = time.perf_counter()
        speedup = self.config.speedup
        arrivals = [tr.timestamp_ms / 1000.0 / speedup for tr in self._trace]
        n = len(arrivals)
        heap: list[tuple[float, int, str]] = []  # (completion time, worker index, worker id)
        ai = 0
        workers = list(self.workers.values())
        while ai < n or heap:
            t = heap[0][0] if heap else arrivals[ai]
            if ai < n and arrivals[ai] < t:
                t = arrivals[ai]
            self._now = t
            while heap and heap[0][0] <= t:
                _, _, wid = heapq.heappop(heap)
                self._complete(self.workers[wid], t)
            while ai < n and arrivals[ai] <= t:
                self._arrive(ai, arrivals[ai])
                ai += 1
            for w in workers:
                if not w.busy and w.engine.has_unfinished():
                    done_at = w.start_step(t)
                    heapq.heappush(heap, (done_at, w.index, w.worker_id))
        return self._report(time.perf_counter() - wall0)

    def _arrive(self, k: int, t: float) -> None:
        tr = self._trace[k]
        rid = f"req-{k}"
        tokens = trace_token_ids(tr, self.config.vocab_size)
        hashes = tuple(hash_blocks(tokens, self._hash_config))
        oracle_blocks = self._oracle.add(hashes, len(tokens))
        # No output length: the live frontend's router does not know it either.
        decision = self.router.route(RouteRequest(rid, len(tokens), None, hashes))
        assert decision is not None  # workers are registered
        wid = decision.worker_id
        tally = self._tally
        if tally.first_arrival is None:
            tally.first_arrival = t
        out_len = max(1, tr.output_length)
        try:
            self.workers[wid].engine.add_request(EngineRequest(
                rid, tuple(tokens), SamplingParams(max_tokens=out_len, temperature=0.0,
                                                   ignore_eos=True), arrival_time=t))
        except InvalidRequestError:
            tally.failed += 1
            self.router.on_finished(rid)
            return
        self._reqs[rid] = _Req(t, len(tokens), out_len, wid, oracle_blocks)
        self._per_worker[wid] += 1

    def _complete(self, w: SimWorker, t: float) -> None:
        res = w.finish_step()
        router = self.router
        for out in res.outputs:
            self._output(out, t)
        if res.kv_events is not None and self._events_on:
            applied = router.apply_events(w.worker_id, res.kv_events)
            if not applied.ok:
                raise RuntimeError(f"router refused {w.worker_id}'s KV events: {applied!r}")
        router.apply_load(w.load_report())

    def _output(self, out: RequestOutput, t: float) -> None:
        rid = out.request_id
        req = self._reqs[rid]
        tally = self._tally
        n = len(out.new_token_ids)
        if n:
            if req.first is None:
                req.first = t
                tally.ttft.append(t - req.arrival)
                self.router.on_prefill_done(rid)
            else:
                tally.itl.append(t - req.last)
            if n > 1:  # tokens of one step arrive together (the mocker samples one a step)
                tally.itl.extend([0.0] * (n - 1))
            req.last = t
            req.num_out += n
        if not out.finished:
            return
        self.router.on_finished(rid)
        del self._reqs[rid]
        ok = out.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) \
            and req.num_out == req.output_len
        if not ok:
            tally.failed += 1
            return
        tally.completed += 1
        tally.e2e.append(t - req.arrival)
        tally.prompt_tokens += req.prompt_len
        tally.cached_tokens += out.num_cached_tokens
        tally.oracle_tokens += req.oracle_blocks * self.config.block_size
        tally.output_tokens += req.num_out
        tally.last_finish = max(tally.last_finish, t)

    # ---------------------------------------------------------------- the report

    def _report(self, wall_s: float) -> ReplayReport:
        c, tally = self.config, self._tally
        stats = self.router.stats()
        duration = tally.last_finish - (tally.first_arrival or 0.0)
        preemptions = sum(w.engine.scheduler.num_preemptions for w in self.workers.values())
        return ReplayReport(
            mode="offline", router=c.router.value, workers=c.workers, speedup=c.speedup,
            requests=len(self._trace), completed=tally.completed,
            failed=tally.failed + len(self._reqs), duration_s=duration,
            ttft=LatencySummary.of_seconds(tally.ttft),
            itl=LatencySummary.of_seconds(np.asarray(tally.itl)),
            e2e=LatencySummary.of_seconds(tally.e2e),
            prompt_tokens=tally.prompt_tokens, cached_tokens=tally.cached_tokens,
            output_tokens=tally.output_tokens,
            output_tokens_per_s=tally.output_tokens / duration if duration > 0 else 0.0,
            prefix_reuse=share(tally.cached_tokens, tally.prompt_tokens),
            oracle_hit_tokens=tally.oracle_tokens,
            oracle_reuse=share(tally.oracle_tokens, tally.prompt_tokens),
            preemptions=preemptions,
            router_stats=RouterSummary(
                stats.requests, stats.prompt_blocks, stats.hit_blocks,
                stats.achievable_hit_blocks, stats.hit_rate, stats.achievable_hit_rate,
                dict(self._per_worker)),
            wall_s=wall_s,
        )


def replay_offline(config: ReplayConfig, requests: Sequence[TraceRequest] | None = None
                   ) -> ReplayReport:
    """Replay ``requests`` (default: the first ``config.limit`` of ``config.trace``), with
    :class:`OfflineReplay`, or :class:`~orchestrator.replay.disagg.DisaggReplay` when the
    config is disaggregated."""
    if requests is None:
        from orchestrator.replay.trace_file import load_trace

        requests = load_trace(config.trace, config.limit)
    if config.disaggregated:
        from orchestrator.replay.disagg import DisaggReplay

        return DisaggReplay(config, requests).run()
    return OfflineReplay(config, requests).run()


__all__ = ["OfflineReplay", "replay_offline"]
