"""The torch model runner: executes a :class:`ScheduledBatch` on a real model (Runner protocol).

For each batch it flattens the scheduled tokens of all sequences (in batch order), gives token
``j`` of a sequence position ``p = start_pos + j`` and cache slot
``block_table[p // block_size] * block_size + p % block_size``, runs the model (which writes the
K/V of those tokens into their slots and attends over each sequence's blocks), computes logits
for the last token of every sequence with ``sample=True`` only, and samples one token for each.
The KV cache tensors (one per layer) belong to the runner; the scheduler owns block ids. So
does the decode mirror (``workers/model/decode_mirror.py``): contiguous copies of the K/V of
the sequences that are decoding, which decode attention reads instead of gathering blocks. It
takes at most ``decode_mirror_bytes`` (default: as much as the KV cache; 0 turns it off).
The caches are zeroed tensors of the runner's own unless ``kv_caches`` hands it ready ones of
the same layout (a shared-memory arena's, ``kvcache.transfer.shm.SharedKvArena``, so that
another process on the host can copy blocks out of them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from workers.engine.sampler import sample
from workers.engine.types import RunnerOutput, ScheduledBatch
from workers.model.attention_metadata import AttentionMetadata
from workers.model.decode_mirror import DecodeMirror
from workers.model.llama import LlamaForCausalLM


class TorchModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_model_len: int | None = None,
        decode_mirror_bytes: int | None = None,
        kv_caches: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}"
            )
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.num_blocks = num_blocks
        self.block_size = block_size
        if kv_caches is None:
            self.kv_caches = self.model.make_kv_caches(num_blocks, block_size, dtype)
        else:
            self.kv_caches = _checked_caches(kv_caches, model.config, num_blocks, block_size,
                                             dtype, self.device)
        if decode_mirror_bytes is None:
            decode_mirror_bytes = sum(c.numel() * c.element_size() for c in self.kv_caches)
        cfg = model.config
        self.mirror = (
            DecodeMirror(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, self.device,
                         max_bytes=decode_mirror_bytes)
            if decode_mirror_bytes > 0
            else None
        )
        self.vocab_size = model.config.vocab_size
        limit = model.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ValueError(
                f"max_model_len must be in 1..{limit} (the model's context), got {max_model_len}"
            )
        self.max_model_len = max_model_len or limit
        self.last_logits: torch.Tensor | None = (
            None  # logits of the last pass's sampled rows (tests)
        )

    def now(self) -> float:
        return time.monotonic()

    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        start = time.monotonic()
        if not batch.seqs:
            return RunnerOutput(sampled={}, duration_s=time.monotonic() - start)
        if batch.block_size != self.block_size:
            raise ValueError(
                f"batch block_size {batch.block_size} != runner block_size {self.block_size}"
            )
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        sampled: dict[str, int] = {}
        sample_seqs = [s for s in batch.seqs if s.sample]
        if sample_seqs:
            ends, total = [], 0
            for s in batch.seqs:
                total += len(s.token_ids)
                if s.sample:
                    ends.append(total - 1)
            rows = torch.tensor(ends, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
            self.last_logits = logits
            tokens = sample(logits, sample_seqs)
            sampled = {s.request_id: t for s, t in zip(sample_seqs, tokens)}
        return RunnerOutput(sampled=sampled, duration_s=time.monotonic() - start)

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flattened input ids, positions and attention metadata for ``batch``."""
        bs = self.block_size
        ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = torch.zeros(len(batch.seqs), max(max_blocks, 1), dtype=torch.int64)
        for row, s in enumerate(batch.seqs):
            n = len(s.token_ids)
            end = s.start_pos + n
            if n == 0 or s.start_pos < 0:
                raise ValueError(f"{s.request_id}: needs at least one token at a position >= 0")
            if end > self.max_model_len:
                raise ValueError(
                    f"{s.request_id}: position {end - 1} is past max_model_len {self.max_model_len}"
                )
            if len(s.block_table) * bs < end:
                raise ValueError(
                    f"{s.request_id}: {len(s.block_table)} blocks of {bs} cannot hold {end} tokens"
                )
            if s.block_table:
                tables[row, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int64)
            ids.extend(s.token_ids)
            query_lens.append(n)
            seq_lens.append(end)
        if tables.numel() and (int(tables.max()) >= self.num_blocks or int(tables.min()) < 0):
            raise ValueError(f"block ids must be in 0..{self.num_blocks - 1}")
        counts = torch.tensor(query_lens)
        row_of_token = torch.repeat_interleave(torch.arange(len(batch.seqs)), counts)
        first_token = torch.cumsum(counts, 0) - counts
        starts = torch.tensor([s.start_pos for s in batch.seqs])
        positions = torch.arange(len(ids)) - first_token[row_of_token] + starts[row_of_token]
        slots = tables[row_of_token, positions // bs] * bs + positions % bs
        device = self.device
        meta = AttentionMetadata(
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=tables.to(device),
            slot_mapping=slots.to(device),
            block_size=bs,
            seq_ids=tuple(s.request_id for s in batch.seqs),
            mirror=self.mirror,
        )
        return torch.tensor(ids, dtype=torch.int64, device=device), positions.to(device), meta


def _checked_caches(caches: Sequence[torch.Tensor], config, num_blocks: int, block_size: int,
                    dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """``caches`` as a list, when they are what ``make_kv_caches`` would have made."""
    caches = list(caches)
    shape = (2, num_blocks * block_size, config.num_kv_heads, config.head_dim)
    if len(caches) != config.num_layers:
        raise ValueError(f"kv_caches holds {len(caches)} tensors, the model has "
                         f"{config.num_layers} layers")
    for i, c in enumerate(caches):
        same_device = c.device.type == device.type and device.index in (None, c.device.index)
        if tuple(c.shape) != shape or c.dtype != dtype or not same_device \
                or not c.is_contiguous():
            raise ValueError(
                f"kv_caches[{i}] is {c.dtype} {tuple(c.shape)} on {c.device}; the runner needs "
                f"contiguous {dtype} {shape} on {device}")
    return caches
