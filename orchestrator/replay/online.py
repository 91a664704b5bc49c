"""Online trace replay: the trace sent on the wall clock to a live local cluster (``ferry replay``
without ``--offline``).

What runs, all owned by :func:`run_online` and stopped by it (also on an error or Ctrl-C):
a :class:`~orchestrator.replay.live_cluster.LiveCluster`: a ``nats-server`` (unless the router
mode needs no events), the mocker workers in this process behind gRPC (aggregated
``worker-0..N-1``, or disaggregated ``prefill-0..P-1`` and ``decode-0..D-1`` with real KV
handles and pulls over gRPC between them), and a
:class:`~orchestrator.frontend.core.Frontend` routed by a
:class:`~orchestrator.routing.service.RoutingService`. In-process servers start in well under
a second and leave nothing behind; the engines' steps sleep, so they share the CPU well.

Then request ``k`` of the trace (arrival order) is sent through ``Frontend.generate`` at
``t0 + timestamp_k / speedup`` (wall clock): prompt token ids as in the offline replay
(:func:`router.trace.trace_token_ids`, built just before the send time), ``max_tokens =
max(1, output_length)``, ``ignore_eos`` (the mocker has no EOS; every request runs to its
length). Each stream is read to its end: TTFT is the first chunk with tokens minus the send
time; a chunk of ``n`` tokens gives one gap after the previous chunk and ``n - 1`` gaps of 0
(workers batch tokens into chunks every few ms); cached tokens come from the final chunk's
usage. A request completes when it ends with its ``output_length`` tokens (LENGTH or STOP);
any other ending counts as failed. The report (:class:`~orchestrator.replay.report.ReplayReport`,
mode ``online``) has the same fields as the offline one; the router's stats are the routing
service's.

Disaggregated, the report's ``disagg`` part (:class:`~orchestrator.replay.report.
DisaggSummary`) has the routing service's decisions by reason (remote ``long_prefill``; local
``short_prefill``, ``prefill_busy``; ``prefill_failed``: remote requests whose prefill worker
failed), the requests each prefill and decode worker got, and the decode workers' KV imports
as they happened (:class:`~orchestrator.replay.live_cluster.ImportLog`: pulls, blocks pulled,
blocks already held, no room, failed pulls, and each import's wall time); ``ttft_at_decode``
counts a remote request's first token when its decode worker sent its first tokens. No KV
bytes move (the mocker's cache has no layers), so the transfer model of the offline replay
(``config.transfer``) does not apply here: it must be left at its default.

At the end (every stream over), every worker must be drained within 10 s: no request, no
pin or reservation, no block in use (:meth:`~orchestrator.replay.live_cluster.LiveCluster.
wait_drained`); else RuntimeError. :attr:`OnlineReplay.left` keeps what each worker held
then.

Times are real: they include gRPC, NATS, the frontend and this machine's load on top of the
modelled step times, and the KV events reach the router a little late (as in production), so
figures differ slightly from the offline replay's. The frontend uses a token-id tokenizer
(decodes to no text): the replay measures routing and scheduling, not detokenization.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from kvcache.hashing import BlockHashConfig, hash_blocks
from orchestrator.frontend.types import FinishReason, FrontendError, GenerateInput
from orchestrator.replay.config import TRANSFER_MODEL_OFFLINE_ONLY, ReplayConfig
from orchestrator.replay.live_cluster import LiveCluster, ReplayFrontend
from orchestrator.replay.oracle import OracleCache
from orchestrator.replay.report import (
    DisaggSummary,
    LatencySummary,
    ReplayReport,
    RouterSummary,
    Tally,
)
from orchestrator.replay.trace_file import replay_order
from orchestrator.replay.transfer import KvTransferModel
from router.disagg import DisaggReason
from router.trace import TraceRequest, trace_token_ids
from workers.server.worker import WorkerRole

_DRAIN_TIMEOUT_S = 10.0


class OnlineReplay:
    """One online replay of ``requests`` under ``config`` (see the module docstring)."""

    def __init__(self, config: ReplayConfig, requests: Sequence[TraceRequest]) -> None:
        if not isinstance(config, ReplayConfig):
            raise TypeError(f"config must be a ReplayConfig, got {type(config).__name__}")
        if config.transfer != KvTransferModel():
            raise ValueError(TRANSFER_MODEL_OFFLINE_ONLY)
        self.config = config
        self._trace = replay_order(requests, config.limit)
        self._hash_config = BlockHashConfig(config.block_size, config.hash_seed)
        self._oracle = OracleCache(config.block_size)
        self._tally = Tally()
        self._ttft_at_decode: list[float] = []
        self._cluster: LiveCluster | None = None
        self.left: dict[str, list[str]] = {}  # what each worker held at the end (module doc)

    async def run(self) -> ReplayReport:
        if self._cluster is not None:
            raise RuntimeError("an OnlineReplay runs once; build a new one to replay again")
        wall0 = time.perf_counter()
        self._cluster = cluster = LiveCluster(self.config)
        try:
            frontend = await cluster.start()
            await self._send_all(frontend)
            self.left = await cluster.wait_drained(_DRAIN_TIMEOUT_S)
            report = self._report(cluster, time.perf_counter() - wall0)
        finally:
            await cluster.stop()
        left = {w: problems for w, problems in self.left.items() if problems}
        if left:
            raise RuntimeError("workers not drained at the end of the replay: " + "; ".join(
                f"{w}: {', '.join(problems)}" for w, problems in left.items()))
        return report

    async def _send_all(self, frontend: ReplayFrontend) -> None:
        speedup = self.config.speedup
        t0 = time.perf_counter() + 0.05
        tasks: list[asyncio.Task] = []
        try:
            for k, tr in enumerate(self._trace):
                tokens = trace_token_ids(tr, self.config.vocab_size)
                hashes = hash_blocks(tokens, self._hash_config)
                oracle_blocks = self._oracle.add(hashes, len(tokens))
                delay = t0 + tr.timestamp_ms / 1000.0 / speedup - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(
                    self._one(frontend, k, tokens, max(1, tr.output_length), oracle_blocks)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, frontend: ReplayFrontend, k: int, tokens: list[int], out_len: int,
                   oracle_blocks: int) -> None:
        tally = self._tally
        arrival = time.perf_counter()
        tally.arrived(arrival)
        inp = GenerateInput(prompt_token_ids=tuple(tokens), request_id=f"req-{k}",
                            max_tokens=out_len, temperature=0.0, ignore_eos=True)
        try:
            stream = await frontend.generate(inp)
        except FrontendError:
            tally.failed += 1
            return
        first: float | None = None
        last = 0.0
        n_out = 0
        itl: list[float] = []
        final = None
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                n = len(chunk.token_ids)
                if n:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last)
                    itl.extend([0.0] * (n - 1))
                    last = now
                    n_out += n
                if chunk.finish_reason is not None:
                    final = chunk
        route_id = frontend.route_ids.pop(inp.request_id, "")
        started = self._cluster.decode_started.pop(route_id, first)  # type: ignore[union-attr]
        ok = (final is not None and final.error is None and n_out == out_len
              and final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP))
        if not ok or first is None:
            tally.failed += 1
            return
        tally.ttft.append(first - arrival)
        tally.itl.extend(itl)
        self._ttft_at_decode.append((started or first) - arrival)
        tally.complete(last, arrival, len(tokens), final.usage.cached_tokens,
                       oracle_blocks * self.config.block_size, n_out)

    def _report(self, cluster: LiveCluster, wall_s: float) -> ReplayReport:
        c, n = self.config, len(self._trace)
        stats = cluster.routing.stats()  # type: ignore[union-attr]
        summary = self._disagg_summary(cluster, stats.disagg_decisions,
                                       stats.router.requests) if c.disaggregated else None
        return self._tally.report(
            c, mode="online", requests=n, failed=n - self._tally.completed,
            preemptions=cluster.preemptions(),
            router=RouterSummary.of(stats.router, cluster.per_worker), wall_s=wall_s,
            disagg=summary)

    def _disagg_summary(self, cluster: LiveCluster, by_reason: dict[str, int], routed: int
                        ) -> DisaggSummary:
        c, imports = self.config, cluster.imports
        decisions = {r.value: by_reason.get(r.value, 0) for r in DisaggReason}
        remote = decisions[DisaggReason.LONG_PREFILL.value]
        transports: dict[str, int] = {}
        for server in cluster.servers.values():
            if server.importer is not None:
                for name, count in server.importer.pulls_by_transport.items():
                    transports[name] = transports.get(name, 0) + count
        return DisaggSummary(
            prefill_workers=c.prefill_workers or 0, decode_workers=c.decode_workers or 0,
            decisions=decisions, remote=remote, local=routed - remote,
            pulls=len(imports.seconds), pulled_blocks=imports.pulled_blocks,
            skipped_blocks=imports.skipped_blocks, no_room=imports.no_room, transfer_bytes=0,
            transfer=LatencySummary.of_seconds(imports.seconds),
            ttft_at_decode=LatencySummary.of_seconds(self._ttft_at_decode),
            kv_bytes_per_token=None, bandwidth_gb_s=None,
            prefill_requests_per_worker=cluster.pool(WorkerRole.PREFILL),
            decode_requests_per_worker=cluster.pool(WorkerRole.DECODE),
            pulls_failed=imports.failed, pulls_by_transport=transports)


def run_online(config: ReplayConfig, requests: Sequence[TraceRequest] | None = None
               ) -> ReplayReport:
    """Replay ``requests`` (default: the first ``config.limit`` of ``config.trace``) against a
    live local cluster that this call starts and stops (see the module docstring)."""
    if requests is None:
        from orchestrator.replay.trace_file import load_trace

        requests = load_trace(config.trace, config.limit)
    return asyncio.run(OnlineReplay(config, requests).run())


__all__ = ["OnlineReplay", "run_online"]
