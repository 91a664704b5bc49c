"""``ferry serve``: Ray, NATS, workers and the frontend of one deployment, started and stopped
together.

Start order: Ray (local, or joined with ``ray_address``) -> nats-server with JetStream (ours
unless ``nats_url`` is given) -> worker actors (engines built in parallel, each behind its gRPC
server; ``workers`` aggregated ones ``w0, w1, ...``, or ``prefill_workers`` prefill ones
``p0, ...`` and ``decode_workers`` decode ones ``d0, ...`` for a disaggregated deployment) -> the frontend in this process (OpenAI HTTP, ferry.v1 gRPC, KServe v2 gRPC; with
``frontends`` > 1 also that many - 1 child frontend processes on the same ports, see
orchestrator/frontend_process.py), which
dials every worker, with its router (orchestrator/routing/: ``--router kv`` by default, fed by
the workers' KV events and load reports over NATS; a worker whose block size or hash seed
differs from the router's is refused and serve fails to start). Stop order is the reverse; every step that started something undoes it,
also when a later step fails, so no nats-server, worker or Ray instance of ours outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator import ray_cluster
from orchestrator.frontend.config import FrontendConfig
from orchestrator.frontend.core import Frontend
from orchestrator.frontend.server import FrontendServer
from orchestrator.frontend_process import FrontendProcesses, FrontendSpec
from orchestrator.nats_server import NatsServer
from orchestrator.routing import RoutingConfig, RoutingService
from orchestrator.worker_actor import WorkerEndpoint, WorkerSpec
from router.disagg import DisaggConfig
from router.types import RouterMode
from workers.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, resolve_model
from workers.engine.config import EngineConfig
from workers.mocker.timing import TimingModel
from workers.server.kv_transport import KV_TRANSPORTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str = DEFAULT_MODEL
    workers: int = 1
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    kserve_grpc_port: int = 8002
    nats_url: str | None = None
    ray_address: str | None = None
    router: str = RouterMode.KV.value  # kv, approx, round_robin, random
    runner: str = "torch"  # "mocker": timing model, no weights (the model gives the tokenizer)
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_cache_bytes: int | None = 512 * 2**20
    timing: TimingModel = field(default_factory=TimingModel)
    # Disaggregated: this many prefill and decode workers instead of ``workers`` aggregated ones.
    prefill_workers: int = 0
    decode_workers: int = 0
    disagg: DisaggConfig = field(default_factory=DisaggConfig)  # local or remote prefill
    # Frontend processes sharing the ports (SO_REUSEPORT): this one and frontends - 1 children
    # (orchestrator/frontend_process.py), each with its own router replica.
    frontends: int = 1
    # How KV blocks move from prefill to decode workers (workers/server/kv_transport.py):
    # auto (shared memory on one host, gRPC between hosts), grpc, shm or cuda-ipc.
    kv_transport: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers!r}")
        for name in ("prefill_workers", "decode_workers"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {n!r}")
        if self.prefill_workers or self.decode_workers:
            if not (self.prefill_workers and self.decode_workers):
                raise ValueError(
                    f"a disaggregated deployment needs prefill and decode workers: give both "
                    f"--prefill-workers and --decode-workers (at least 1 each; got "
                    f"{self.prefill_workers} and {self.decode_workers}), or --workers N alone "
                    f"for aggregated workers")
            if self.workers != 1:
                raise ValueError("give either --workers N (aggregated workers) or "
                                 "--prefill-workers P --decode-workers D (disaggregated), not both")
        if isinstance(self.frontends, bool) or not isinstance(self.frontends, int) \
                or self.frontends < 1:
            raise ValueError(f"--frontends must be at least 1 (one process per core is the most "
                             f"that helps), got {self.frontends!r}")
        if not isinstance(self.disagg, DisaggConfig):
            raise TypeError(f"disagg must be a DisaggConfig, got {type(self.disagg).__name__}")
        modes = [m.value for m in RouterMode]
        if self.router not in modes:
            raise ValueError(f"--router must be one of {modes}, got {self.router!r}")
        if self.runner not in ("torch", "mocker"):
            raise ValueError(f"--runner must be 'torch' or 'mocker', got {self.runner!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"--kv-transport must be one of {list(KV_TRANSPORTS)}, got "
                             f"{self.kv_transport!r}")


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str
    kserve_grpc: str
    nats: str
    ray: str
    model: str
    workers: tuple[WorkerEndpoint, ...]
    frontends: tuple[int, ...] = ()  # pids of the frontend processes beyond this one

    def lines(self) -> list[str]:
        roles = [w.role for w in self.workers]
        if "prefill" in roles or "decode" in roles:
            on = f"{roles.count('prefill')} prefill + {roles.count('decode')} decode workers"
        else:
            on = f"{len(self.workers)} worker(s)"
        out = [
            f"ferry: serving model '{self.model}' on {on}",
            f"  OpenAI HTTP   {self.http}/v1   (curl {self.http}/v1/models)",
            f"  ferry gRPC    {self.grpc}   (service ferry.v1.Ferry)",
            f"  KServe gRPC   {self.kserve_grpc}   (inference.GRPCInferenceService)",
            f"  NATS          {self.nats}",
            f"  Ray           {self.ray}",
        ]
        if self.frontends:
            out.append(f"  frontends     {len(self.frontends) + 1} processes on these ports "
                       f"(pids {os.getpid()} {' '.join(map(str, self.frontends))})")
        out += [f"  worker {w.worker_id:<8} {w.address}  pid {w.pid}"
                + ("" if w.role == "aggregated" else f"  ({w.role})") for w in self.workers]
        return out

    def json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def served_name(model: str) -> str:
    return model if model in EMBEDDED_MODELS else resolve_model(model).name


def worker_roles(cfg: ServeConfig) -> list[tuple[str, str]]:
    """(worker id, role) of every worker the deployment starts."""
    if cfg.prefill_workers:
        return [(f"p{i}", "prefill") for i in range(cfg.prefill_workers)] \
            + [(f"d{i}", "decode") for i in range(cfg.decode_workers)]
    return [(f"w{i}", "aggregated") for i in range(cfg.workers)]


def worker_specs(cfg: ServeConfig, nats_url: str, vocab: int, max_len: int) -> list[WorkerSpec]:
    return [
        WorkerSpec(worker_id=worker_id, model=cfg.model, served_model_name=served_name(cfg.model),
                   runner=cfg.runner, engine=cfg.engine, kv_cache_bytes=cfg.kv_cache_bytes,
                   mocker_vocab_size=vocab, mocker_max_model_len=max_len, timing=cfg.timing,
                   nats_url=nats_url, host=cfg.host, role=role, kv_transport=cfg.kv_transport)
        for worker_id, role in worker_roles(cfg)
    ]


def run_event_loop(coro) -> object:
    """Run ``coro`` to its end on uvloop (what the frontends use: a cheaper event loop), or
    on asyncio's own loop where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_serve(cfg: ServeConfig, on_ready: Callable[[Endpoints], None],
              stop: asyncio.Event | None = None) -> None:
    """Run the deployment until SIGINT/SIGTERM (or ``stop`` is set); always cleans up."""
    from orchestrator.control_plane import ControlPlane  # imports Ray
    from workers.loader.tokenizer_loader import load_model_info  # imports torch

    info = load_model_info(resolve_model(cfg.model))
    max_len = cfg.engine.max_model_len or info.config.max_position_embeddings
    owns_ray = ray_cluster.connect(cfg.ray_address)
    nats = None
    plane = None
    try:
        if cfg.nats_url is None:
            nats = NatsServer(host="127.0.0.1").start()
        nats_url = cfg.nats_url or nats.url
        plane = ControlPlane()
        endpoints = plane.start_workers(
            worker_specs(cfg, nats_url, info.tokenizer.vocab_size, max_len))
        run_event_loop(_serve_frontend(cfg, info.tokenizer, endpoints, nats_url, on_ready,
                                       stop))
    finally:
        if plane is not None:
            plane.stop_all()
        if nats is not None:
            nats.stop()
        if owns_ray:
            ray_cluster.disconnect()


def routing_config(cfg: ServeConfig) -> RoutingConfig:
    """The frontend's router: ``cfg.router`` mode, the workers' block size and hash seed, and
    the disaggregation thresholds."""
    return RoutingConfig(mode=cfg.router, hash_config=cfg.engine.hash_config, disagg=cfg.disagg)


@contextlib.asynccontextmanager
async def serving_frontend(cfg: ServeConfig, tokenizer, workers, nats_url: str | None,
                           catch_up_s: float = 10.0):
    """The frontend with its router, every worker registered (a worker the router refuses,
    e.g. another block size or hash seed, raises ValueError with the reason), the router's
    index rebuilt from the event stream (waiting at most ``catch_up_s``); closed on exit."""
    routing = RoutingService(routing_config(cfg), nats_url)
    frontend = Frontend(tokenizer, FrontendConfig(model_name=served_name(cfg.model),
                                                  max_model_len=cfg.engine.max_model_len))
    routing.attach(frontend)
    try:
        for w in workers:
            await frontend.add_worker(w.worker_id, w.address)
        if not await routing.start(timeout=catch_up_s):
            log.warning("router: NATS at %s not reachable yet; routing without KV events until "
                        "it is", nats_url)
        elif not await routing.catch_up(timeout=catch_up_s):
            log.warning("router: the KV index did not catch up with the event stream within "
                        "%.0fs; it goes on catching up while serving", catch_up_s)
        yield frontend, routing
    finally:
        try:
            await frontend.close()
        finally:
            await routing.close()


async def _serve_frontend(cfg, tokenizer, workers, nats_url, on_ready, stop) -> None:
    import ray

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving_frontend(cfg, tokenizer, workers, nats_url) as (frontend, _):
        server = FrontendServer(frontend, host=cfg.host, http_port=cfg.http_port,
                                grpc_port=cfg.grpc_port, kserve_port=cfg.kserve_grpc_port,
                                reuse_port=cfg.frontends > 1)
        ports = await server.start()
        children = FrontendProcesses()
        try:
            specs = [FrontendSpec(cfg, tokenizer, tuple(workers), nats_url, ports.http,
                                  ports.grpc, ports.kserve, i) for i in range(1, cfg.frontends)]
            pids = await asyncio.to_thread(children.start, specs) if specs else []
            ray_addr = ray.get_runtime_context().gcs_address
            on_ready(Endpoints(http=f"http://{cfg.host}:{ports.http}",
                               grpc=f"{cfg.host}:{ports.grpc}",
                               kserve_grpc=f"{cfg.host}:{ports.kserve}", nats=nats_url,
                               ray=ray_addr, model=frontend.model_name, workers=tuple(workers),
                               frontends=tuple(pids)))
            await stop.wait()
        finally:
            await asyncio.to_thread(children.stop)
            await server.stop()
