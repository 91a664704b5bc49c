"""Online trace replay: the trace sent on the wall clock to a live local cluster (``ferry replay``
without ``--offline``).

What runs, all owned by :func:`run_online` and stopped by it (also on an error or Ctrl-C):

1. a ``nats-server`` with JetStream of its own (:class:`orchestrator.nats_server.NatsServer`,
   a free port in a temporary folder), unless the router mode needs no events
   (``round_robin``, ``random``);
2. ``config.workers`` mocker workers in this process: each an
   :class:`~workers.engine.engine.LLMEngine` over a
   :class:`~workers.mocker.runner.MockerRunner` on the wall clock (a step really takes its
   modelled time, on the engine's own thread) behind a
   :class:`~workers.server.worker.WorkerServer` (gRPC on a free port of 127.0.0.1),
   publishing KV events and load reports to that NATS. In-process servers start in well
   under a second and leave nothing behind; the engines' steps sleep, so they share the CPU
   well;
3. a :class:`~orchestrator.frontend.core.Frontend` routed by a
   :class:`~orchestrator.routing.service.RoutingService` (``config.router``, the replay's
   cost config and seed), which registers every worker (block size and hash seed checked)
   and, in ``kv`` mode, builds its index from the workers' events over NATS.

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
from orchestrator.frontend.config import FrontendConfig
from orchestrator.frontend.core import Frontend
from orchestrator.frontend.types import FinishReason, FrontendError, GenerateInput
from orchestrator.nats_server import NatsServer
from orchestrator.replay.config import DISAGG_ONLINE_NOT_SUPPORTED, ReplayConfig
from orchestrator.replay.oracle import OracleCache
from orchestrator.replay.report import ReplayReport, RouterSummary, Tally
from orchestrator.replay.sim_workers import mocker_engine
from orchestrator.replay.trace_file import replay_order
from orchestrator.routing import RoutingConfig, RoutingService
from router.trace import TraceRequest, trace_token_ids
from router.types import RouterStats
from workers.mocker.clock import WallClock
from workers.server.worker import WorkerConfig, WorkerServer

MODEL_NAME = "ferry-replay-mocker"
_READY_TIMEOUT_S = 30.0


class TokenIdTokenizer:
    """The frontend's tokenizer for token-id prompts: no text, no special tokens."""

    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, vocab_size: int) -> None:
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise ValueError("the replay frontend takes token ids only, not text")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> str:
        raise ValueError("the replay frontend takes token ids only, not chat messages")


class _Cluster:
    """NATS (when needed), the mocker workers and the routed frontend of one replay."""

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.nats: NatsServer | None = None
        self.servers: dict[str, WorkerServer] = {}
        self.routing: RoutingService | None = None
        self.frontend: Frontend | None = None
        self.per_worker: dict[str, int] = {}

    async def start(self) -> Frontend:
        c = self.config
        routing_config = RoutingConfig(
            mode=c.router, hash_config=BlockHashConfig(c.block_size, c.hash_seed),
            cost=c.cost_config, seed=c.seed)
        if routing_config.needs_nats:
            self.nats = await asyncio.to_thread(NatsServer(host="127.0.0.1").start)
        nats_url = self.nats.url if self.nats is not None else None
        for i in range(c.workers):
            wid = f"worker-{i}"
            server = WorkerServer(mocker_engine(c, WallClock()),
                                  WorkerConfig(worker_id=wid, model=MODEL_NAME,
                                               nats_url=nats_url))
            self.servers[wid] = server  # registered first: stop() stops a half-started one
            await server.start()
        self.routing = RoutingService(routing_config, nats_url)
        self.frontend = Frontend(TokenIdTokenizer(c.vocab_size),
                                 FrontendConfig(model_name=MODEL_NAME))
        self.routing.attach(self.frontend)
        pick = self.frontend.pick_worker
        self.per_worker = dict.fromkeys(self.servers, 0)

        def counting_pick(request):
            worker_id = pick(request)
            self.per_worker[worker_id] = self.per_worker.get(worker_id, 0) + 1
            return worker_id

        self.frontend.pick_worker = counting_pick
        for wid, server in self.servers.items():
            await self.frontend.add_worker(wid, server.address)
        if not await self.routing.start(timeout=_READY_TIMEOUT_S):
            raise RuntimeError(f"the router could not reach its NATS at {nats_url} within "
                               f"{_READY_TIMEOUT_S:.0f}s")
        return self.frontend

    async def stop(self) -> None:
        """Stop everything started, in reverse order; every step runs even if one fails."""
        steps = []
        if self.frontend is not None:
            steps.append(self.frontend.close())
        if self.routing is not None:
            steps.append(self.routing.close())
        steps.append(asyncio.gather(*(s.stop(0.5) for s in self.servers.values()),
                                    return_exceptions=True))
        errors = []
        for step in steps:
            try:
                await step
            except Exception as e:  # noqa: BLE001 - go on stopping the rest
                errors.append(e)
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
        if errors:
            raise errors[0]

    def preemptions(self) -> int:
        return sum(s.engine.scheduler.num_preemptions for s in self.servers.values())


class OnlineReplay:
    """One online replay of ``requests`` under ``config`` (see the module docstring)."""

    def __init__(self, config: ReplayConfig, requests: Sequence[TraceRequest]) -> None:
        if not isinstance(config, ReplayConfig):
            raise TypeError(f"config must be a ReplayConfig, got {type(config).__name__}")
        if config.disaggregated:
            raise ValueError(DISAGG_ONLINE_NOT_SUPPORTED)
        self.config = config
        self._trace = replay_order(requests, config.limit)
        self._hash_config = BlockHashConfig(config.block_size, config.hash_seed)
        self._oracle = OracleCache(config.block_size)
        self._tally = Tally()

    async def run(self) -> ReplayReport:
        wall0 = time.perf_counter()
        cluster = _Cluster(self.config)
        try:
            frontend = await cluster.start()
            await self._send_all(frontend)
            stats = cluster.routing.stats().router
            preemptions = cluster.preemptions()
        finally:
            await cluster.stop()
        return self._report(stats, dict(cluster.per_worker), preemptions,
                            time.perf_counter() - wall0)

    async def _send_all(self, frontend: Frontend) -> None:
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

    async def _one(self, frontend: Frontend, k: int, tokens: list[int], out_len: int,
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
        ok = (final is not None and final.error is None and n_out == out_len
              and final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP))
        if not ok or first is None:
            tally.failed += 1
            return
        tally.ttft.append(first - arrival)
        tally.itl.extend(itl)
        tally.complete(last, arrival, len(tokens), final.usage.cached_tokens,
                       oracle_blocks * self.config.block_size, n_out)

    def _report(self, stats: RouterStats, per_worker: dict[str, int], preemptions: int,
                wall_s: float) -> ReplayReport:
        n = len(self._trace)
        return self._tally.report(
            self.config, mode="online", requests=n, failed=n - self._tally.completed,
            preemptions=preemptions, router=RouterSummary.of(stats, per_worker), wall_s=wall_s)


def run_online(config: ReplayConfig, requests: Sequence[TraceRequest] | None = None
               ) -> ReplayReport:
    """Replay ``requests`` (default: the first ``config.limit`` of ``config.trace``) against a
    live local cluster that this call starts and stops (see the module docstring)."""
    if requests is None:
        from orchestrator.replay.trace_file import load_trace

        requests = load_trace(config.trace, config.limit)
    return asyncio.run(OnlineReplay(config, requests).run())


__all__ = ["OnlineReplay", "TokenIdTokenizer", "run_online"]
