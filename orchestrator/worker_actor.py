"""The Ray actor that hosts one worker: an engine (torch model or mocker) behind the worker
gRPC server, publishing KV events and load to NATS.

Lifecycle (control plane side / actor side):
- the control plane creates the actor with its resources (one GPU where Ray has GPUs, a CPU
  share otherwise) and a :class:`WorkerSpec`;
- the actor's process tunes malloc for bulk KV transfers (kvcache/transfer/tuning.py),
  deletes KV arenas in /dev/shm left by killed workers, and builds the engine (a prefill
  worker's KV caches in a shared-memory arena unless ``kv_transport`` is grpc, see
  workers/server/kv_transport.py);
- ``start()`` binds the gRPC server on a port the OS picks and returns a
  :class:`WorkerEndpoint` (the address the frontend dials);
- ``stop()`` drains nothing and stops at once: in-flight streams end, the gRPC server closes,
  the NATS link closes, the KV arena is unlinked; then the control plane kills the actor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from workers.engine.config import EngineConfig
from workers.mocker.timing import TimingModel
from workers.server.kv_transport import check_kv_transport

ROLES = ("aggregated", "prefill", "decode")  # the values of workers.server.worker.WorkerRole


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    model: str  # model folder, .gguf file or embedded name (the torch runner loads it)
    served_model_name: str
    runner: str = "torch"  # "torch" or "mocker"
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_cache_bytes: int | None = None  # torch runner: size the cache by memory
    mocker_vocab_size: int = 49152
    mocker_max_model_len: int = 8192
    timing: TimingModel = field(default_factory=TimingModel)
    nats_url: str | None = None
    host: str = "127.0.0.1"
    torch_threads: int | None = None
    role: str = "aggregated"  # "aggregated", "prefill" or "decode" (WorkerConfig.role)
    kv_transport: str = "auto"  # WorkerConfig.kv_transport: auto, grpc, shm or cuda-ipc

    def __post_init__(self) -> None:
        check_kv_transport(self.kv_transport)
        if self.runner not in ("torch", "mocker"):
            raise ValueError(f"runner must be 'torch' or 'mocker', got {self.runner!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class WorkerEndpoint:
    worker_id: str
    address: str
    pid: int
    block_size: int
    hash_seed: int
    num_blocks: int
    max_model_len: int
    role: str = "aggregated"


def build_engine(spec: WorkerSpec):
    """The engine a spec describes and the shared-memory arena holding its KV caches (None
    when they are private; see workers/server/kv_transport.py). Runs inside the worker's
    process."""
    from workers.server.kv_transport import arena_name, mocker_arena, wants_arena

    name = arena_name(spec.worker_id) if wants_arena(spec.kv_transport, spec.role) else None
    if spec.runner == "mocker":
        from workers.engine.engine import LLMEngine
        from workers.mocker.clock import WallClock
        from workers.mocker.runner import MockerRunner

        runner = MockerRunner(spec.mocker_vocab_size, spec.mocker_max_model_len,
                              timing=spec.timing, clock=WallClock())
        arena = None
        if name is not None:
            try:
                arena = mocker_arena(name, spec.engine.block_size, spec.engine.num_blocks)
            except ValueError:  # no room in /dev/shm
                if spec.kv_transport != "auto":
                    raise
        return LLMEngine(runner, spec.engine), arena
    import torch

    from workers.engine.factory import build_torch_engine

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    # auto: a /dev/shm too small for the KV cache (docker's default is 64 MiB) means private
    # caches, and KV handles pulled over gRPC
    built = build_torch_engine(spec.model, spec.engine, kv_cache_bytes=spec.kv_cache_bytes,
                               kv_arena_name=name, kv_arena_optional=spec.kv_transport == "auto")
    return built.engine, built.kv_arena


class WorkerActor:
    """Wrapped with ``ray.remote`` by the control plane (this module imports ray only inside the
    actor, for its node address)."""

    def __init__(self, spec: WorkerSpec) -> None:
        from kvcache.transfer.tuning import tune_malloc
        from workers.server.kv_transport import remove_stale_arenas

        tune_malloc()  # bulk KV transfers reuse heap buffers (kvcache/transfer/tuning.py)
        remove_stale_arenas()  # left in /dev/shm by workers killed before their stop
        self.spec = spec
        self.server = None
        self.engine, self.kv_arena = build_engine(spec)

    async def start(self) -> WorkerEndpoint:
        from workers.server.worker import WILDCARD_HOSTS, WorkerConfig, WorkerServer

        advertise = None
        if self.spec.host in WILDCARD_HOSTS:  # others dial this node's address
            import ray  # in the actor's process, which Ray started

            advertise = ray.util.get_node_ip_address()
        config = WorkerConfig(worker_id=self.spec.worker_id, model=self.spec.served_model_name,
                              role=self.spec.role, host=self.spec.host, port=0,
                              advertise_host=advertise,
                              nats_url=self.spec.nats_url, kv_transport=self.spec.kv_transport)
        self.server = WorkerServer(self.engine, config, kv_arena=self.kv_arena)
        address = await self.server.start()
        cfg = self.engine.config
        return WorkerEndpoint(worker_id=self.spec.worker_id, address=address, pid=os.getpid(),
                              block_size=cfg.block_size, hash_seed=cfg.hash_seed,
                              num_blocks=cfg.num_blocks,
                              max_model_len=self.engine.max_model_len, role=self.spec.role)

    async def ping(self) -> int:
        return os.getpid()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=0.5)
            self.server = None
