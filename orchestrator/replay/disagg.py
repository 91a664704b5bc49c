"""Offline disaggregated replay: P prefill and D decode mocker workers behind the real
:class:`~router.disagg.DisaggRouter`, on one virtual clock.

The workers, the clock and the event order are those of the aggregated replay
(:mod:`orchestrator.replay.sim_loop`, :mod:`orchestrator.replay.sim_workers`); the request
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
from collections.abc import Sequence

from kvcache.holds import PinnedBlocks
from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.report import DisaggSummary, LatencySummary, ReplayReport, RouterSummary
from orchestrator.replay.sim_loop import SimReplay, SimRequest
from orchestrator.replay.sim_workers import SimWorker
from router.disagg import DisaggReason, DisaggRouter, PoolRole
from router.trace import TraceRequest
from router.types import RouterMode, WorkerInfo
from workers.engine.kv_import import ImportPlan, commit_import, plan_import
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)

_PULL = 1  # event kind after sim_loop.STEP: a pull ends
_OK = (FinishReason.LENGTH, FinishReason.STOP)


class _Req(SimRequest):
    __slots__ = ("cached", "decode", "decode_first", "first_token", "on_prefill", "prefill",
                 "started", "tokens")

    def __init__(self, rid: str, arrival: float, tokens: tuple[int, ...], output_len: int,
                 oracle_blocks: int, decode: str, prefill: str | None) -> None:
        super().__init__(rid, arrival, output_len, oracle_blocks)
        self.tokens = tokens
        self.decode = decode
        self.prefill = prefill  # None: prefilled on the decode worker
        self.on_prefill = prefill is not None  # its prefill-worker request is running
        self.first_token = 0
        self.cached = 0  # prompt tokens the worker that computed the prompt had cached
        self.started = False  # remote: the decode worker produced tokens
        self.decode_first: float | None = None  # remote: when it did


class DisaggReplay(SimReplay):
    """One disaggregated replay of ``requests`` under ``config`` (see the module docstring);
    :meth:`run` once."""

    disaggregated = True
    wrong_config = ("DisaggReplay needs prefill_workers and decode_workers; replay "
                    "aggregated workers with orchestrator.replay.simulator")

    def __init__(self, config: ReplayConfig, requests: Sequence[TraceRequest]) -> None:
        super().__init__(config, requests)
        self.disagg = DisaggRouter(self.router, config.disagg_config, seed=config.seed,
                                   clock=self._clock)
        self._events_on = self.router.mode is RouterMode.KV
        self._load_on = self.router.mode in (RouterMode.KV, RouterMode.APPROX)
        assert config.prefill_workers is not None and config.decode_workers is not None
        roles = [(f"prefill-{i}", PoolRole.PREFILL) for i in range(config.prefill_workers)]
        roles += [(f"decode-{i}", PoolRole.DECODE) for i in range(config.decode_workers)]
        for wid, role in roles:
            self._add_worker(wid)
            self.disagg.add_worker(WorkerInfo(wid, self._hash_config, config.num_blocks), role)
        self._reqs: dict[str, _Req] = {}
        self._pull_seq = 0
        self._pull_s: list[float] = []
        self._ttft_at_decode: list[float] = []
        self._pulled_blocks = self._skipped_blocks = self._no_room = 0

    def _event(self, kind: int, payload: object, t: float) -> None:
        if kind == _PULL:
            self._pulled(*payload, t)  # type: ignore[misc]
        else:
            super()._event(kind, payload, t)

    def _check_end(self) -> None:
        for w in self.workers.values():
            w.check_drained()
        if self._reqs:
            raise RuntimeError(f"{len(self._reqs)} request(s) never finished, e.g. "
                               f"{next(iter(self._reqs))!r} (replay bug)")

    def _arrive(self, k: int, t: float) -> None:
        route, tokens, oracle_blocks = self._prompt(k, t)
        routed = self.disagg.route(route)
        assert routed is not None  # decode workers are registered
        decision = routed[0]
        req = _Req(route.request_id, t, tokens, max(1, self._trace[k].output_length),
                   oracle_blocks, decision.decode_worker, decision.prefill_worker)
        self._reqs[req.rid] = req
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
        self._apply_events(w, res.kv_events)
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
        self._tokens(req, t, 1)
        self.disagg.on_first_token(req.rid)
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
            if self._tokens(req, t, n):
                self.disagg.on_first_token(req.rid)
        if not out.finished:
            return
        if req.prefill is None:
            req.cached = out.num_cached_tokens
        self._finish(req, t, ok=out.finish_reason in _OK and req.num_out == req.output_len)

    def _finish(self, req: _Req, t: float, ok: bool) -> None:
        self.disagg.on_finished(req.rid)
        del self._reqs[req.rid]
        if not ok:
            self._tally.failed += 1
            return
        first = req.decode_first if req.decode_first is not None else req.first
        self._ttft_at_decode.append((first if first is not None else t) - req.arrival)
        self._tally.complete(t, req.arrival, len(req.tokens), req.cached,
                             req.oracle_blocks * self.config.block_size, req.num_out)

    # ---------------------------------------------------------------- the report

    def _report(self, wall_s: float) -> ReplayReport:
        c = self.config
        stats = self.disagg.stats()
        decisions = {r.value: stats.decisions.get(r, 0) for r in DisaggReason}
        remote = decisions[DisaggReason.LONG_PREFILL.value]
        pool = self.disagg.pool
        summary = DisaggSummary(
            prefill_workers=c.prefill_workers or 0, decode_workers=c.decode_workers or 0,
            decisions=decisions, remote=remote, local=stats.routing.requests - remote,
            pulls=len(self._pull_s), pulled_blocks=self._pulled_blocks,
            skipped_blocks=self._skipped_blocks, no_room=self._no_room,
            transfer_bytes=c.transfer.bytes_of(self._pulled_blocks * c.block_size),
            transfer=LatencySummary.of_seconds(self._pull_s),
            ttft_at_decode=LatencySummary.of_seconds(self._ttft_at_decode),
            kv_bytes_per_token=c.transfer.bytes_per_token,
            bandwidth_gb_s=c.transfer.bandwidth_gb_s,
            prefill_requests_per_worker={w: self._per_worker[w] for w in pool(False)},
            decode_requests_per_worker={w: self._per_worker[w] for w in pool(True)})
        return self._tally.report(
            c, mode="offline", requests=len(self._trace), failed=self._tally.failed,
            preemptions=self._preemptions(),
            router=RouterSummary.of(stats.routing, self._per_worker), wall_s=wall_s,
            disagg=summary)


__all__ = ["DisaggReplay"]
