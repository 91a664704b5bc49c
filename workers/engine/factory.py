"""Builds a ready torch engine from a model spec (folder, .gguf file, or embedded name)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from kvcache.transfer.layout import KvLayout, dtype_name
from kvcache.transfer.shm import SharedKvArena
from workers.embedded import EMBEDDED_MODELS, resolve_model
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.model_runner import TorchModelRunner
from workers.loader import LoadedModel, load_model
from workers.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class TorchEngine:
    engine: LLMEngine
    loaded: LoadedModel
    model_name: str  # the name clients use: the embedded name, or the folder / file name
    # The shared-memory arena holding the KV caches (``kv_arena_name`` given), else None. Its
    # owner (the worker) closes it at shutdown, which unlinks /dev/shm/NAME.
    kv_arena: SharedKvArena | None = None


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * block_size * elem


def build_torch_engine(
    model: str,
    config: EngineConfig | None = None,
    *,
    kv_cache_bytes: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    kv_arena_name: str | None = None,
    kv_arena_optional: bool = False,
) -> TorchEngine:
    """Load ``model`` and wrap it in an engine. ``kv_cache_bytes``, when given, sets the number
    of KV blocks from a memory budget instead of ``config.num_blocks``. ``kv_arena_name``,
    when given, puts the KV caches in a new shared-memory arena ``/dev/shm/NAME``
    (:class:`kvcache.transfer.shm.SharedKvArena`; host memory, so ``device`` must be "cpu"):
    decode workers on this host then copy blocks straight out of it. When /dev/shm has no room
    for it, that is a ValueError, or with ``kv_arena_optional`` a warning and private caches
    (``TorchEngine.kv_arena`` None)."""
    if kv_arena_name is not None and torch.device(device).type != "cpu":
        raise ValueError(f"a shared-memory KV arena lives in host memory, the engine runs on "
                         f"{device}: drop kv_arena_name (GPU caches use the cuda-ipc transport)")
    config = config or EngineConfig()
    loaded = load_model(resolve_model(model), dtype=dtype)
    if kv_cache_bytes is not None:
        per_block = kv_bytes_per_block(loaded.config, config.block_size, dtype)
        num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ValueError(
                f"a KV cache of {kv_cache_bytes} bytes holds no block of {per_block} bytes; "
                "give more memory to the KV cache or a smaller block size")
        config = dataclasses.replace(config, num_blocks=int(num_blocks))
    arena = None
    if kv_arena_name is not None:
        c = loaded.config
        try:
            arena = SharedKvArena.create(kv_arena_name, KvLayout(
                c.num_layers, config.block_size, c.num_kv_heads, c.head_dim, dtype_name(dtype),
                config.num_blocks))
        except ValueError as exc:  # no room in /dev/shm
            if not kv_arena_optional:
                raise
            log.warning("%s; the KV caches stay private to this process", exc)
    try:
        runner = TorchModelRunner(loaded.model, config.num_blocks, config.block_size,
                                  dtype=dtype, device=device, max_model_len=config.max_model_len,
                                  kv_caches=None if arena is None else arena.caches)
        engine = LLMEngine(runner, config, tokenizer=loaded.tokenizer)
    except BaseException:
        if arena is not None:
            arena.close()
        raise
    name = model if model in EMBEDDED_MODELS else loaded.name
    return TorchEngine(engine=engine, loaded=loaded, model_name=name, kv_arena=arena)
