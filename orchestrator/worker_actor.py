"""The Ray actor that hosts one worker: an engine (torch model or mocker) behind the worker
gRPC server, publishing KV events and load to NATS.

Lifecycle (control plane side / actor side):
- the control plane creates the actor with its resources (one GPU where Ray has GPUs, a CPU
  share otherwise) and a :class:`WorkerSpec`;
- ``start()`` builds the engine inside the actor's process, binds the gRPC server on a port
  the OS picks, and returns a :class:`WorkerEndpoint` (the address the frontend dials);
- ``stop()`` drains nothing and stops at once: in-flight streams end, the gRPC server closes,
  the NATS link closes; then the control plane kills the actor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from workers.engine.config import EngineConfig
from workers.mocker.timing import TimingModel

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

    def __post_init__(self) -> None:
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
    """The engine a spec describes (runs inside the worker's process)."""
    if spec.runner == "mocker":
        from workers.engine.engine import LLMEngine
        from workers.mocker.clock import WallClock
        from workers.mocker.runner import MockerRunner

        runner = MockerRunner(spec.mocker_vocab_size, spec.mocker_max_model_len,
                              timing=spec.timing, clock=WallClock())
        return LLMEngine(runner, spec.engine)
    import torch

    from workers.engine.factory import build_torch_engine

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    return build_torch_engine(spec.model, spec.engine, kv_cache_bytes=spec.kv_cache_bytes).engine


class WorkerActor:
    """Wrapped with ``ray.remote`` by the control plane (this module does not import ray)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.server = None
        self.engine = build_engine(spec)

    async def start(self) -> WorkerEndpoint:
        from workers.server.worker import WorkerConfig, WorkerServer

        config = WorkerConfig(worker_id=self.spec.worker_id, model=self.spec.served_model_name,
                              role=self.spec.role, host=self.spec.host, port=0,
                              nats_url=self.spec.nats_url)
        self.server = WorkerServer(self.engine, config)
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
