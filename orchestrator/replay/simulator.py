"""Offline trace replay: the real router, schedulers and block pools of N mocker workers in one
process, on one virtual clock (a discrete-event simulation; hours of traffic in minutes).

Each worker is an :class:`~workers.engine.engine.LLMEngine` over a
:class:`~workers.mocker.runner.MockerRunner` with its own
:class:`~workers.mocker.clock.VirtualClock`; prefix caching is on and the block hashes use
the router's seed and block size. The engines have no tokenizer, hence no EOS: every request
runs to ``max_tokens = output_length`` (at least 1: a request always yields its first token).
Each worker is a :class:`~orchestrator.replay.sim_workers.SimWorker`, and the event loop is
:class:`~orchestrator.replay.sim_loop.SimReplay`'s (shared with the disaggregated replay); a
disaggregated config (prefill and decode workers) is replayed by
:mod:`orchestrator.replay.disagg` instead (:func:`replay_offline` picks it).

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

from collections.abc import Sequence

from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.report import ReplayReport, RouterSummary
from orchestrator.replay.sim_loop import SimReplay, SimRequest
from orchestrator.replay.sim_workers import SimWorker
from router.router import Router
from router.trace import TraceRequest
from router.types import RouterMode, WorkerInfo
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)


class _Req(SimRequest):
    __slots__ = ("prompt_len", "worker_id")

    def __init__(self, rid: str, arrival: float, prompt_len: int, output_len: int,
                 worker_id: str, oracle_blocks: int) -> None:
        super().__init__(rid, arrival, output_len, oracle_blocks)
        self.prompt_len = prompt_len
        self.worker_id = worker_id


class OfflineReplay(SimReplay):
    """One replay of ``requests`` under ``config`` (see the module docstring); :meth:`run` once."""

    disaggregated = False
    wrong_config = ("this config is disaggregated: replay it with "
                    "orchestrator.replay.disagg.DisaggReplay (replay_offline picks it)")
    router: Router

    def __init__(self, config: ReplayConfig, requests: Sequence[TraceRequest]) -> None:
        super().__init__(config, requests)
        self._events_on = self.router.mode is not RouterMode.APPROX
        for i in range(config.workers):
            w = self._add_worker(f"worker-{i}")
            self.router.add_worker(WorkerInfo(w.worker_id, self._hash_config, config.num_blocks))
        self._reqs: dict[str, _Req] = {}

    def _arrive(self, k: int, t: float) -> None:
        route, tokens, oracle_blocks = self._prompt(k, t)
        rid = route.request_id
        decision = self.router.route(route)
        assert decision is not None  # workers are registered
        wid = decision.worker_id
        out_len = max(1, self._trace[k].output_length)
        try:
            self.workers[wid].engine.add_request(EngineRequest(
                rid, tokens, SamplingParams(max_tokens=out_len, temperature=0.0,
                                            ignore_eos=True), arrival_time=t))
        except InvalidRequestError:
            self._tally.failed += 1
            self.router.on_finished(rid)
            return
        self._reqs[rid] = _Req(rid, t, len(tokens), out_len, wid, oracle_blocks)
        self._per_worker[wid] += 1

    def _complete(self, w: SimWorker, t: float) -> None:
        res = w.finish_step()
        for out in res.outputs:
            self._output(out, t)
        self._apply_events(w, res.kv_events)
        self.router.apply_load(w.load_report())

    def _output(self, out: RequestOutput, t: float) -> None:
        rid = out.request_id
        req = self._reqs[rid]
        n = len(out.new_token_ids)
        if n and self._tokens(req, t, n):
            self.router.on_prefill_done(rid)
        if not out.finished:
            return
        self.router.on_finished(rid)
        del self._reqs[rid]
        ok = out.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) \
            and req.num_out == req.output_len
        if not ok:
            self._tally.failed += 1
            return
        self._tally.complete(t, req.arrival, req.prompt_len, out.num_cached_tokens,
                             req.oracle_blocks * self.config.block_size, req.num_out)

    def _report(self, wall_s: float) -> ReplayReport:
        return self._tally.report(
            self.config, mode="offline", requests=len(self._trace),
            failed=self._tally.failed + len(self._reqs), preemptions=self._preemptions(),
            router=RouterSummary.of(self.router.stats(), self._per_worker), wall_s=wall_s)


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
