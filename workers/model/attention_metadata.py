"""How the model reads and writes the paged KV cache.

KV cache layout (one tensor per layer): ``[2, num_blocks * block_size, num_kv_heads, head_dim]``
in the model dtype; index 0 holds keys, 1 values. Slot ``b * block_size + o`` is offset ``o``
of physical block ``b``. A forward pass writes the K/V of every new token into the slot given
by ``slot_mapping`` and, for each sequence, attends over slots of its block table up to
``seq_lens[i]`` tokens (causal within the new tokens). With a decode mirror, rows with one new
token (decode) read their context from the mirror, which the pass keeps in step with the
cache (``decode_mirror.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model.decode_mirror import DecodeMirror


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence, in the order of the flattened input
    seq_lens: list[int]  # context length per sequence after this pass (start_pos + query_len)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    block_size: int
    # Optional: the runner's decode mirror (decode_mirror.py) and the id of each sequence, so
    # decode rows attend over contiguous copies of their K/V instead of gathering blocks
    seq_ids: tuple[str, ...] | None = None
    mirror: DecodeMirror | None = None
