"""The online replay's live local cluster (:mod:`orchestrator.replay.online`): NATS, mocker
workers behind gRPC, a frontend routed by a RoutingService, all in this process, and what it
counts for the report.

:class:`LiveCluster` starts (and stops, in reverse order, every step even if one fails):

1. a ``nats-server`` with JetStream of its own (:class:`orchestrator.nats_server.NatsServer`,
   a free port in a temporary folder), unless the router mode needs no events
   (``round_robin``, ``random``);
2. the workers, each a :class:`~workers.server.worker.WorkerServer` (gRPC on a free port of
   127.0.0.1) over a mocker engine on the wall clock
   (:func:`~orchestrator.replay.sim_workers.mocker_engine`: a step really takes its modelled
   time, on the engine's own thread), publishing KV events and load reports to that NATS:
   - aggregated: ``worker-0..N-1``;
   - disaggregated: ``prefill-0..P-1`` (role ``prefill``: ``prefill_only`` requests, pinned
     prompt blocks, KV handles) and ``decode-0..D-1`` (role ``decode``: ``remote_prefill``
     requests pull the handle's blocks, ``workers.server.disagg``), with ``kv_transport =
     grpc``: a decode worker pulls from the prefill worker over the KvTransfer gRPC stream
     and releases the handle there. The mocker's cache has no layers, so a pull moves the
     blocks' ids and hashes and no KV bytes; the blocks still enter the decode worker's
     prefix cache (and its KV events);
3. a :class:`~orchestrator.frontend.core.Frontend` (a token-id tokenizer: no text) routed by
   a :class:`~orchestrator.routing.service.RoutingService` (the replay's router mode, cost
   config, seed and, disaggregated, :class:`~router.disagg.DisaggConfig`), which registers
   every worker with its role (block size and hash seed checked). Disaggregated, the
   frontend takes its two-hop path (``orchestrator.frontend.disagg``) with the service as its
   planner.

What it records, around the live path without changing it:

- requests per worker: the frontend's picker (aggregated) or the service's ``plan_disagg``
  (disaggregated) is wrapped to count each choice (a retry counts again);
- ``route_ids``: the caller's request id -> the frontend's route id (``Frontend.prepare``);
- ``decode_started``: route id -> when a remote request's decode worker sent its first tokens
  (the planner's ``decode_started``);
- ``imports``: every decode worker's KV imports (``KvImporter.run`` wrapped): the blocks
  pulled and skipped, why not (no room, a failed pull), and how long each took, from the
  decode worker taking the handle to the blocks committed to its cache (reserving and
  committing each wait for an engine step boundary; the gRPC pull between them);
- the disaggregation decisions by reason are the routing service's own (``/metrics``:
  ``ferry_router_*``; the frontend counts the same in ``ferry_frontend_disagg_decisions``).

:meth:`LiveCluster.wait_drained` (after the last request): every worker's engine holds no
request, no hold (pin or import reservation) and no block in use, and passes its integrity
checks, within a timeout (KV handles are released in the background).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcache.hashing import BlockHashConfig
from orchestrator.frontend.config import FrontendConfig
from orchestrator.frontend.core import Frontend, PreparedRequest
from orchestrator.frontend.types import DisaggPlan, GenerateInput, RouteRequest
from orchestrator.nats_server import NatsServer
from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.sim_workers import drain_problems, mocker_engine
from orchestrator.routing import RoutingConfig, RoutingService
from workers.mocker.clock import WallClock
from workers.server.disagg import ImportOutcome, KvImporter
from workers.server.worker import WorkerConfig, WorkerRole, WorkerServer

MODEL_NAME = "ferry-replay-mocker"
READY_TIMEOUT_S = 30.0


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


class ReplayFrontend(Frontend):
    """A Frontend that remembers each request's route id (the id the router keys it by)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.route_ids: dict[str, str] = {}

    def prepare(self, inp: GenerateInput) -> PreparedRequest:
        prep = super().prepare(inp)
        self.route_ids[prep.request_id] = prep.worker_request.request_id
        return prep


@dataclass
class ImportLog:
    """The decode workers' KV imports (see the module docstring)."""

    seconds: list[float] = field(default_factory=list)  # imports that pulled blocks
    pulled_blocks: int = 0
    skipped_blocks: int = 0
    no_room: int = 0
    failed: int = 0

    def add(self, outcome: ImportOutcome, seconds: float) -> None:
        self.skipped_blocks += outcome.skipped_blocks
        if outcome.pulled_blocks:
            self.seconds.append(seconds)
            self.pulled_blocks += outcome.pulled_blocks
        elif outcome.no_room:
            self.no_room += 1
        elif outcome.local_reason is not None:
            self.failed += 1

    def watch(self, importer: KvImporter) -> None:
        run = importer.run

        async def timed(owner, handle, prompt_token_ids) -> ImportOutcome:
            t0 = time.perf_counter()
            outcome = await run(owner, handle, prompt_token_ids)
            self.add(outcome, time.perf_counter() - t0)
            return outcome

        importer.run = timed  # type: ignore[method-assign]


class _CountingPlanner:
    """The routing service as the frontend's DisaggPlanner, counting its choices and noting
    when each remote request's decode worker started."""

    def __init__(self, routing: RoutingService, cluster: LiveCluster) -> None:
        self._routing = routing
        self._cluster = cluster

    def plan_disagg(self, request: RouteRequest, prefill_candidates: tuple[str, ...]
                    ) -> DisaggPlan:
        plan = self._routing.plan_disagg(request, prefill_candidates)
        self._cluster.count(plan.decode_worker)
        if plan.prefill_worker is not None:
            self._cluster.count(plan.prefill_worker)
        return plan

    def decode_started(self, route_id: str) -> None:
        self._cluster.decode_started[route_id] = time.perf_counter()
        self._routing.decode_started(route_id)

    def prefill_failed(self, route_id: str) -> None:
        self._routing.prefill_failed(route_id)


class LiveCluster:
    """NATS (when needed), the mocker workers and the routed frontend of one replay."""

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.nats: NatsServer | None = None
        self.servers: dict[str, WorkerServer] = {}
        self.roles: dict[str, WorkerRole] = {}
        self.routing: RoutingService | None = None
        self.frontend: ReplayFrontend | None = None
        self.per_worker: dict[str, int] = {}
        self.decode_started: dict[str, float] = {}
        self.imports = ImportLog()

    def count(self, worker_id: str) -> None:
        self.per_worker[worker_id] = self.per_worker.get(worker_id, 0) + 1

    async def start(self) -> ReplayFrontend:
        c = self.config
        routing_config = RoutingConfig(
            mode=c.router, hash_config=BlockHashConfig(c.block_size, c.hash_seed),
            cost=c.cost_config, seed=c.seed, disagg=c.disagg_config)
        if routing_config.needs_nats:
            self.nats = await asyncio.to_thread(NatsServer(host="127.0.0.1").start)
        nats_url = self.nats.url if self.nats is not None else None
        if c.prefill_workers is not None and c.decode_workers is not None:
            self.roles = {f"prefill-{i}": WorkerRole.PREFILL for i in range(c.prefill_workers)}
            self.roles |= {f"decode-{i}": WorkerRole.DECODE for i in range(c.decode_workers)}
        else:
            self.roles = {f"worker-{i}": WorkerRole.AGGREGATED for i in range(c.workers)}
        for wid, role in self.roles.items():
            server = WorkerServer(mocker_engine(c, WallClock()), WorkerConfig(
                worker_id=wid, model=MODEL_NAME, role=role, nats_url=nats_url,
                kv_transport="grpc"))
            self.servers[wid] = server  # registered first: stop() stops a half-started one
            await server.start()
            if role is WorkerRole.DECODE and server.importer is not None:
                self.imports.watch(server.importer)
        self.routing = RoutingService(routing_config, nats_url)
        self.frontend = ReplayFrontend(TokenIdTokenizer(c.vocab_size),
                                        FrontendConfig(model_name=MODEL_NAME))
        self.routing.attach(self.frontend)
        self.per_worker = dict.fromkeys(self.servers, 0)
        pick = self.frontend.pick_worker

        def counting_pick(request: RouteRequest) -> str:
            worker_id = pick(request)
            self.count(worker_id)
            return worker_id

        self.frontend.pick_worker = counting_pick
        self.frontend.disagg.planner = _CountingPlanner(self.routing, self)
        for wid, server in self.servers.items():
            await self.frontend.add_worker(wid, server.address)
        if not await self.routing.start(timeout=READY_TIMEOUT_S):
            raise RuntimeError(f"the router could not reach its NATS at {nats_url} within "
                               f"{READY_TIMEOUT_S:.0f}s")
        return self.frontend

    async def wait_drained(self, timeout_s: float = 10.0) -> dict[str, list[str]]:
        """Poll every worker until none holds anything (see the module docstring); what is
        left on each (empty lists: drained) when that or ``timeout_s`` comes first."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = {wid: await s.aengine.call(drain_problems)  # type: ignore[union-attr]
                    for wid, s in self.servers.items()}
            if not any(left.values()) or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.02)

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

    def pool(self, role: WorkerRole) -> dict[str, int]:
        """Requests each worker of ``role`` got."""
        return {w: self.per_worker.get(w, 0) for w, r in self.roles.items() if r is role}

    def preemptions(self) -> int:
        return sum(s.engine.scheduler.num_preemptions for s in self.servers.values())


__all__ = ["MODEL_NAME", "READY_TIMEOUT_S", "ImportLog", "LiveCluster", "ReplayFrontend",
           "TokenIdTokenizer"]
