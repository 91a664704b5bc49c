"""Offline disaggregated replay: P prefill and D decode mocker workers behind the real
:class:`~router.disagg.DisaggRouter`, on one virtual clock.

The workers, the clock and the event order are those of the aggregated replay
(:mod:`orchestrator.replay.simulator`, :mod:`orchestrator.replay.sim_workers`); the request
path is the live one (``orchestrator.frontend.disagg``, ``workers.server.disagg``), with the
network hops taking no time and the KV pull taking the transfer model's
(:mod:`orchestrator.replay.transfer`). Workers are ``prefill-0..P-1`` and ``decode-0..D-1``.

One request, at arrival time ``t0`` (F: the frontend's part, P: the prefill worker, D: the
decode worker):

1. F: ``DisaggRouter.route`` picks D and, when the prompt is prefilled remotely, P (reasons
   ``long_prefill``; local: ``short_prefill``, ``prefill_busy``).
2. Local: D gets the request as it is (the aggregated path) and the first token D samples is
   the request's first token.
3. Remote: P gets it with ``max_tokens = 1`` and ``pin_prompt``; P prefills what it does not
   cache and samples the first token at the completion ``t1`` of that step: the client has
   its first token at ``t1`` (F streams P's token at once), so **TTFT = t1 - t0**: the queue
   and the prefill on P. ``on_first_token``. Finishing, the request pins its full prompt
   blocks on P (``kvcache.holds``: in use, not evictable).
   - ``output_length == 1``: the request ends at ``t1``; F releases the handle: P's pin is
     released (on P's engine thread, between its steps).
   - else D, between its steps (at ``t1``, or when its running step completes), plans the
     import (``workers.engine.kv_import.plan_import``): the leading handle blocks it already
     caches are skipped, fresh blocks are reserved for the rest. Nothing to pull (all held)
     or no room: P's pin is released and D gets the request now (no room: D prefills the
     prompt itself). Else the pull of ``pull_blocks * block_size`` tokens takes
     ``KvTransferModel.seconds`` from that moment ``t2`` to ``t3``; at ``t3`` D commits the
     import (the blocks enter its prefix cache; their ``BlockStored`` events go to the router
     with D's next step, so the next turn of the conversation finds them on D) and P releases
     the pin, each between its steps. D's request is the prompt plus the first token,
     ``max_tokens = output_length - 1``: its prefix lookup finds the imported blocks and it
     computes only the partial last block and the first token, then decodes. Its first
     tokens: ``on_decode_started``; the gap from the first token to D's is the first
     inter-token latency. (The report also gives ``ttft_at_decode``: the first token
     counted when the decode worker produces its first, i.e. after the pull: what NVIDIA
     Dynamo's mocker replay reports as TTFT, which collects tokens on decode workers only.)
4. P fails the request (it can never fit P's cache): ``on_prefill_failed``, and D prefills it
   locally, as the live frontend's fallback.
5. The request ends: ``on_finished``.

Events at the same instant: step completions (worker order: prefill workers, then decode
workers), then ends of pulls (in the order they started), then arrivals (trace order), then
idle workers with work start steps. A completed step's outputs are handled first, then its KV
events go to the router, then the calls waiting for that worker's step boundary run, then its
load report goes to the router.

The router sees what the live ``RoutingService`` sees: KV events of every worker in ``kv``
mode only, load reports in ``kv`` and ``approx`` modes; in-flight entries always (so that
``round_robin`` decides local or remote on the whole prompt length, as live).

At the end every worker must be drained (no request, pin, reservation or block in use, and the
engines' integrity checks pass): else RuntimeError.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

import numpy as np

from kvcache.hashing import BlockHashConfig, hash_blocks
from kvcache.holds import PinnedBlocks
from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.oracle import OracleCache
from orchestrator.replay.report import DisaggSummary, LatencySummary, ReplayReport, RouterSummary
from orchestrator.replay.sim_workers import SimWorker, Tally, make_worker, share
from router.disagg import DisaggReason, DisaggRouter, PoolRole
from router.router import make_router
from router.trace import TraceRequest, trace_token_ids
from router.types import RouteRequest, RouterMode, WorkerInfo
from workers.engine.kv_import import ImportPlan, commit_import, plan_import
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)

_STEP, _PULL = 0, 1  # event kinds, in their order at one instant
_OK = (FinishReason.LENGTH, FinishReason.STOP)


class _Req:
    __slots__ = ("arrival", "cached", "decode", "decode_first", "first", "first_token", "last",
                 "num_out", "on_prefill", "oracle_blocks", "output_len", "prefill", "rid",
                 "started", "tokens")

    def __init__(self, rid: str, arrival: float, tokens: tuple[int, ...], output_len: int,
                 oracle_blocks: int, decode: str, prefill: str | None) -> None:
        self.rid = rid
        self.arrival = arrival
        self.tokens = tokens
        self.output_len = output_len
        self.oracle_blocks = oracle_blocks
        self.decode = decode
        self.prefill = prefill  # None: prefilled on the decode worker
        self.on_prefill = prefill is not None  # its prefill-worker request is running
        self.first: float | None = None
        self.first_token = 0
        self.last = 0.0
        self.num_out = 0
        self.cached = 0  # prompt tokens the worker that computed the prompt had cached
        self.started = False  # remote: the decode worker produced tokens
        self.decode_first: float | None = None  # remote: when it did


class DisaggReplay:
    """One disaggregated replay of ``requests`` under ``config`` (see the module docstring);
    :meth:`run` once."""

    def __init__(self, config: ReplayConfig, requests: Sequence[TraceRequest]) -> None:
        if not isinstance(config, ReplayConfig):
            raise TypeError(f"config must be a ReplayConfig, got {type(config).__name__}")
        if not config.disaggregated:
            raise ValueError("DisaggReplay needs prefill_workers and decode_workers; replay "
                             "aggregated workers with orchestrator.replay.simulator")
        if not requests:
            raise ValueError("nothing to replay: the trace holds no requests")
        self.config = config
        reqs = list(requests)[: config.limit] if config.limit is not None else list(requests)
        order = sorted(range(len(reqs)), key=lambda i: (reqs[i].timestamp_ms, i))
        self._trace = [reqs[i] for i in order]
        self._hash_config = BlockHashConfig(config.block_size, config.hash_seed)
        self._now = 0.0
        self.router = make_router(config.router, self._hash_config, config.cost_config,
                                  seed=config.seed, clock=self._clock)
        self.disagg = DisaggRouter(self.router, config.disagg_config, seed=config.seed,
                                   clock=self._clock)
        self._events_on = self.router.mode is RouterMode.KV
        self._load_on = self.router.mode in (RouterMode.KV, RouterMode.APPROX)
        assert config.prefill_workers is not None and config.decode_workers is not None
        self.workers: dict[str, SimWorker] = {}
        roles = [(f"prefill-{i}", PoolRole.PREFILL) for i in range(config.prefill_workers)]
        roles += [(f"decode-{i}", PoolRole.DECODE) for i in range(config.decode_workers)]
        for index, (wid, role) in enumerate(roles):
            self.workers[wid] = make_worker(config, index, wid)
            self.disagg.add_worker(WorkerInfo(wid, self._hash_config, config.num_blocks), role)
        self._oracle = OracleCache(config.block_size)
        self._reqs: dict[str, _Req] = {}
        self._tally = Tally()
        self._per_worker = dict.fromkeys(self.workers, 0)
        self._heap: list[tuple[float, int, int, object]] = []
        self._pull_seq = 0
        self._pull_s: list[float] = []
        self._ttft_at_decode: list[float] = []
        self._pulled_blocks = self._skipped_blocks = self._no_room = 0
        self._ran = False

    def _clock(self) -> float:
        return self._now

    # ---------------------------------------------------------------- the loop

    def run(self) -> ReplayReport:
        if self._ran:
            raise RuntimeError("a DisaggReplay runs once; build a new one to replay again")
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
                if kind == _STEP:
                    self._complete(self.workers[payload], t)  # type: ignore[index]
                else:
                    self._pulled(*payload, t)  # type: ignore[misc]
            while ai < n and arrivals[ai] <= t:
                self._arrive(ai, arrivals[ai])
                ai += 1
            for w in workers:
                if not w.busy and w.engine.has_unfinished():
                    heapq.heappush(heap, (w.start_step(t), _STEP, w.index, w.worker_id))
        for w in workers:
            w.check_drained()
        if self._reqs:
            raise RuntimeError(f"{len(self._reqs)} request(s) never finished, e.g. "
                               f"{next(iter(self._reqs))!r} (replay bug)")
        return self._report(time.perf_counter() - wall0)

    def _arrive(self, k: int, t: float) -> None:
        tr = self._trace[k]
        rid = f"req-{k}"
        tokens = tuple(trace_token_ids(tr, self.config.vocab_size))
        hashes = tuple(hash_blocks(tokens, self._hash_config))
        oracle_blocks = self._oracle.add(hashes, len(tokens))
        # No output length: the live frontend's router does not know it either.
        routed = self.disagg.route(RouteRequest(rid, len(tokens), None, hashes))
        assert routed is not None  # decode workers are registered
        decision = routed[0]
        tally = self._tally
        if tally.first_arrival is None:
            tally.first_arrival = t
        req = _Req(rid, t, tokens, max(1, tr.output_length), oracle_blocks,
                   decision.decode_worker, decision.prefill_worker)
        self._reqs[rid] = req
        self._per_worker[req.decode] += 1
        if req.prefill is None:
            self._add(req, req.decode, tokens, req.output_len, t)
        else:
            self._per_worker[req.prefill] += 1
            self._add(req, req.prefill, tokens, 1, t, pin=True)

    def _add(self, req: _Req, worker_id: str, tokens: tuple[int, ...], max_tokens: int,
             t: float, pin: bool = False) -> None:
        try:
            self.workers[worker_id].engine.add_request(EngineRequest(
                req.rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                ignore_eos=True),
                arrival_time=t, pin_prompt=pin))
        except InvalidRequestError:  # too long for this worker: the request fails
            self._finish(req, t, ok=False)

    def _complete(self, w: SimWorker, t: float) -> None:
        res = w.finish_step()
        for out in res.outputs:
            req = self._reqs[out.request_id]
            if req.on_prefill and w.worker_id == req.prefill:
                self._prefill_output(w, req, out, t)
            else:
                self._decode_output(req, out, t)
        if res.kv_events is not None and self._events_on:
            applied = self.router.apply_events(w.worker_id, res.kv_events)
            if not applied.ok:
                raise RuntimeError(f"router refused {w.worker_id}'s KV events: {applied!r}")
        w.run_calls(t)
        if self._load_on:
            self.router.apply_load(w.load_report())

    # ---------------------------------------------------------------- prefill worker

    def _prefill_output(self, p: SimWorker, req: _Req, out: RequestOutput, t: float) -> None:
        if not out.finished:  # max_tokens 1: its token comes with its end
            raise RuntimeError(f"{p.worker_id}: prefill-only request {req.rid!r} produced "
                               "tokens without finishing (replay bug)")
        req.on_prefill = False
        pinned = out.pinned
        if out.finish_reason not in _OK or len(out.new_token_ids) != 1 or pinned is None:
            # P failed it (an abort or error pins nothing): the decode worker prefills it
            if pinned is not None:
                self._release(p, pinned, t)
            self.disagg.on_prefill_failed(req.rid)
            req.prefill = None
            self._add(req, req.decode, req.tokens, req.output_len, t)
            return
        req.first_token = out.new_token_ids[0]  # the client has it now (F streams it)
        req.cached = out.num_cached_tokens
        self._first_token(req, t, 1)
        if req.output_len == 1:  # ends with the first token: the frontend frees the handle
            self._release(p, pinned, t)
            self._finish(req, t, ok=True)
            return
        d = self.workers[req.decode]
        d.call(lambda t2: self._start_pull(req, p, d, pinned, t2), t)

    def _release(self, p: SimWorker, pinned: PinnedBlocks, t: float) -> None:
        p.call(lambda _t: p.engine.kv.holds.release(pinned.hold_id), t)

    # ---------------------------------------------------------------- the pull

    def _start_pull(self, req: _Req, p: SimWorker, d: SimWorker, pinned: PinnedBlocks,
                    t: float) -> None:
        plan = plan_import(d.engine, pinned.block_hashes, req.rid)
        self._skipped_blocks += plan.skip_blocks
        if plan.hold_id is None:  # all held already, or no room: D computes what it lacks
            self._no_room += plan.no_room
            self._release(p, pinned, t)
            self._add_decode(req, d, t)
            return
        seconds = self.config.transfer.seconds(plan.pull_blocks * self.config.block_size)
        self._pull_s.append(seconds)
        self._pulled_blocks += plan.pull_blocks
        self._pull_seq += 1
        heapq.heappush(self._heap, (t + seconds, _PULL, self._pull_seq, (req, p, d, pinned,
                                                                          plan)))

    def _pulled(self, req: _Req, p: SimWorker, d: SimWorker, pinned: PinnedBlocks,
                plan: ImportPlan, t: float) -> None:
        def commit(t3: float) -> None:
            commit_import(d.engine, plan, req.tokens)
            self._add_decode(req, d, t3)

        d.call(commit, t)
        self._release(p, pinned, t)

    def _add_decode(self, req: _Req, d: SimWorker, t: float) -> None:
        self._add(req, d.worker_id, (*req.tokens, req.first_token), req.output_len - 1, t)

    # ---------------------------------------------------------------- decode worker

    def _decode_output(self, req: _Req, out: RequestOutput, t: float) -> None:
        n = len(out.new_token_ids)
        if n:
            if req.prefill is not None and not req.started:
                req.started, req.decode_first = True, t
                self.disagg.on_decode_started(req.rid)
            if req.first is None:
                self._first_token(req, t, n)
            else:
                self._tally.itl.append(t - req.last)
                if n > 1:
                    self._tally.itl.extend([0.0] * (n - 1))
                req.last = t
                req.num_out += n
        if not out.finished:
            return
        if req.prefill is None:
            req.cached = out.num_cached_tokens
        self._finish(req, t, ok=out.finish_reason in _OK and req.num_out == req.output_len)

    def _first_token(self, req: _Req, t: float, n: int) -> None:
        req.first = req.last = t
        req.num_out = n
        self._tally.ttft.append(t - req.arrival)
        if n > 1:  # tokens of one step arrive together
            self._tally.itl.extend([0.0] * (n - 1))
        self.disagg.on_first_token(req.rid)

    def _finish(self, req: _Req, t: float, ok: bool) -> None:
        self.disagg.on_finished(req.rid)
        del self._reqs[req.rid]
        tally = self._tally
        if not ok:
            tally.failed += 1
            return
        tally.completed += 1
        tally.e2e.append(t - req.arrival)
        first = req.decode_first if req.decode_first is not None else req.first
        self._ttft_at_decode.append((first if first is not None else t) - req.arrival)
        tally.prompt_tokens += len(req.tokens)
        tally.cached_tokens += req.cached
        tally.oracle_tokens += req.oracle_blocks * self.config.block_size
        tally.output_tokens += req.num_out
        tally.last_finish = max(tally.last_finish, t)

    # ---------------------------------------------------------------- the report

    def _report(self, wall_s: float) -> ReplayReport:
        c, tally = self.config, self._tally
        stats = self.disagg.stats()
        rs = stats.routing
        duration = tally.last_finish - (tally.first_arrival or 0.0)
        preemptions = sum(w.engine.scheduler.num_preemptions for w in self.workers.values())
        decisions = {r.value: stats.decisions.get(r, 0) for r in DisaggReason}
        remote = decisions[DisaggReason.LONG_PREFILL.value]
        pool = self.disagg.pool
        summary = DisaggSummary(
            prefill_workers=c.prefill_workers or 0, decode_workers=c.decode_workers or 0,
            decisions=decisions, remote=remote, local=rs.requests - remote,
            pulls=len(self._pull_s), pulled_blocks=self._pulled_blocks,
            skipped_blocks=self._skipped_blocks, no_room=self._no_room,
            transfer_bytes=c.transfer.bytes_of(self._pulled_blocks * c.block_size),
            transfer=LatencySummary.of_seconds(self._pull_s),
            ttft_at_decode=LatencySummary.of_seconds(self._ttft_at_decode),
            kv_bytes_per_token=c.transfer.bytes_per_token,
            bandwidth_gb_s=c.transfer.bandwidth_gb_s,
            prefill_requests_per_worker={w: self._per_worker[w] for w in pool(False)},
            decode_requests_per_worker={w: self._per_worker[w] for w in pool(True)})
        return ReplayReport(
            mode="offline", router=c.router.value, workers=c.num_workers, speedup=c.speedup,
            requests=len(self._trace), completed=tally.completed, failed=tally.failed,
            duration_s=duration,
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
                rs.requests, rs.prompt_blocks, rs.hit_blocks, rs.achievable_hit_blocks,
                rs.hit_rate, rs.achievable_hit_rate, dict(self._per_worker)),
            wall_s=wall_s, disagg=summary)


__all__ = ["DisaggReplay"]
