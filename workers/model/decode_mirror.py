"""Contiguous copies of the K/V of the sequences that are decoding, so decode attention reads
them in place instead of gathering every sequence's blocks in every layer at every step.

The paged cache (``attention_metadata.py``) stays the only source of truth: every pass still
writes every new token's K/V there, and KV transfer, prefix caching and preemption see only it.
The mirror is derived from it and owned by the model runner (one per runner, passed to the model
in :class:`AttentionMetadata`):

* per layer one tensor ``[2, rows, KVH, capacity, D]``: row ``r`` holds, for each KV head, the
  keys (index 0) and values (1) of one decoding sequence, position after position, so a
  batch of rows is the ``[n, KVH, L, D]`` SDPA reads with no copy;
* :meth:`DecodeMirror.plan` is called once per pass with the pass's decode rows (one new token
  each), by sequence id. A sequence keeps its row while it decodes step after step: its
  mirror then holds exactly ``seq_len - 1`` tokens, and this pass appends one. Any other decode
  row (first decode step, back after preemption or a prefill chunk, KV imported from another
  worker, or a row whose length or blocks do not match) joins: it gets a free row that
  each layer fills from the paged cache before attending. Sequences that are not decode rows
  in this pass lose their row.
* rows are handed out lowest first; when more than a quarter of the rows in use are holes left
  by finished sequences, the rows above the holes move down (they re-join, filled from the
  paged cache). Holes inside the span attend to one position (finite garbage that is dropped).
* capacity grows (doubling) as sequences grow; when the mirror would exceed ``max_bytes`` the
  pass gets no mirror plan (the caller gathers from the paged cache) and the mirror empties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIN_TOKENS = 256  # first token capacity; doubles from there
_ROW_STEP = 8  # rows are allocated in multiples of this


@dataclass(frozen=True)
class DecodeEntry:
    """One decode row of a pass, in the order of the flattened input."""

    seq_id: str
    seq_len: int  # context after this pass (the new token is at seq_len - 1)
    blocks: tuple[int, ...]  # physical blocks holding the seq_len tokens


@dataclass
class MirrorStep:
    """What every layer of one pass does with the mirror (built once by :meth:`plan`)."""

    span: int  # rows 0..span-1 take part (holes included)
    length: int  # longest context of the pass: positions 0..length-1 are read
    q_rows: torch.Tensor | None  # [n] mirror row of each decode entry; None: row i is entry i
    write_index: torch.Tensor  # [n * KVH] rows of a layer's K half seen as [rows*KVH*cap, D]
    mask: torch.Tensor | None  # [span, 1, 1, length] additive; None: every row is `length` long
    # joiners with the same context length, filled together: (mirror rows [g], rows of the
    # paged cache seen as [2 * num_blocks, block] holding their K then V blocks, tokens)
    joiners: list[tuple[torch.Tensor, torch.Tensor, int]]


class DecodeMirror:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bytes: int,
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.max_bytes = dtype, device, max_bytes
        self.layers: list[torch.Tensor] = []
        self.num_rows = 0  # allocated rows
        self.capacity = 0  # allocated tokens per row
        # seq id -> (row, tokens held, blocks holding them)
        self._rows: dict[str, tuple[int, int, tuple[int, ...]]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def clear(self) -> None:
        self._rows.clear()

    def plan(
        self, entries: list[DecodeEntry], block_size: int, num_blocks: int
    ) -> MirrorStep | None:
        """Assign rows for this pass's decode ``entries``; None when they do not fit."""
        n = len(entries)
        kept: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        joining: list[DecodeEntry] = []
        for e in entries:
            old = self._rows.get(e.seq_id)
            if old is not None and old[1] == e.seq_len - 1 and e.blocks[: len(old[2])] == old[2]:
                kept[e.seq_id] = old
            else:
                joining.append(e)
        top = max((r for r, _, _ in kept.values()), default=-1)
        if top + 1 - n > max(1, n // 4):  # too many holes below the top row: move rows down
            kept = {sid: v for sid, v in kept.items() if v[0] < n}
            joining = [e for e in entries if e.seq_id not in kept]
        taken = {r for r, _, _ in kept.values()}
        free = (r for r in range(n + len(taken)) if r not in taken)
        rows = {sid: v[0] for sid, v in kept.items()}
        by_length: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for e in joining:
            rows[e.seq_id] = row = next(free)
            tokens = e.seq_len - 1
            if tokens:
                context = e.blocks[: -(-tokens // block_size)]
                by_length.setdefault(tokens, []).append((row, context))
        joiners = []
        for tokens, group in by_length.items():
            blocks = torch.tensor([b for _, context in group for b in context])
            joiners.append(
                (
                    torch.tensor([r for r, _ in group], device=self.device),
                    torch.cat((blocks, blocks + num_blocks)).to(self.device),
                    tokens,
                )
            )
        span = max(rows.values()) + 1
        length = max(e.seq_len for e in entries)
        if not self._reserve(span, length):
            self._rows.clear()
            return None
        self._rows = {e.seq_id: (rows[e.seq_id], e.seq_len, e.blocks) for e in entries}
        order = [rows[e.seq_id] for e in entries]
        q_rows = None if span == n and order == list(range(n)) else torch.tensor(order)
        lens = [1] * span
        for e, r in zip(entries, order):
            lens[r] = e.seq_len
        mask = None
        if min(lens) != length:
            keep = torch.arange(length)[None, :] < torch.tensor(lens)[:, None]
            mask = torch.zeros(span, length, dtype=self.dtype).masked_fill_(~keep, float("-inf"))
            mask = mask.view(span, 1, 1, length).to(self.device)
        kvh, cap = self.num_kv_heads, self.capacity
        write = [
            (r * kvh + h) * cap + e.seq_len - 1 for e, r in zip(entries, order) for h in range(kvh)
        ]
        return MirrorStep(
            span=span,
            length=length,
            q_rows=None if q_rows is None else q_rows.to(self.device),
            write_index=torch.tensor(write, device=self.device),
            mask=mask,
            joiners=joiners,
        )

    def _reserve(self, rows: int, tokens: int) -> bool:
        """Grow to hold ``rows`` rows of ``tokens`` tokens (keeping the content); False when
        that would pass ``max_bytes``."""
        if rows <= self.num_rows and tokens <= self.capacity:
            return True
        new_rows = max(self.num_rows, -(-rows // _ROW_STEP) * _ROW_STEP)
        new_cap = max(self.capacity, _MIN_TOKENS)
        while new_cap < tokens:
            new_cap *= 2
        per_layer = 2 * new_rows * self.num_kv_heads * new_cap * self.head_dim
        elem = torch.tensor([], dtype=self.dtype).element_size()
        if per_layer * elem * self.num_layers > self.max_bytes:
            return False
        shape = (2, new_rows, self.num_kv_heads, new_cap, self.head_dim)
        grown = []
        for old in self.layers or [None] * self.num_layers:
            t = torch.zeros(shape, dtype=self.dtype, device=self.device)  # holes stay finite
            if old is not None:
                t[:, : self.num_rows, :, : self.capacity].copy_(old)
            grown.append(t)
        self.layers, self.num_rows, self.capacity = grown, new_rows, new_cap
        return True

    def fill(self, layer: int, cache: torch.Tensor, step: MirrorStep, block_size: int) -> None:
        """Copy the joiners' context from the paged ``cache`` of ``layer`` into their rows."""
        if not step.joiners:
            return
        kvh, D = self.num_kv_heads, self.head_dim
        view = cache.view(-1, block_size, kvh, D)
        mirror = self.layers[layer]
        for rows, cache_rows, tokens in step.joiners:
            kv = view.index_select(0, cache_rows).view(2, rows.shape[0], -1, kvh, D)
            mirror[:, rows, :, :tokens] = kv[:, :, :tokens].transpose(2, 3)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: MirrorStep) -> None:
        """Append this pass's ``k``/``v [n, KVH, D]`` (decode entries, in order)."""
        mirror = self.layers[layer]
        D = self.head_dim
        mirror[0].view(-1, D).index_copy_(0, step.write_index, k.reshape(-1, D))
        mirror[1].view(-1, D).index_copy_(0, step.write_index, v.reshape(-1, D))

    def kv(self, layer: int, step: MirrorStep) -> tuple[torch.Tensor, torch.Tensor]:
        """``[span, KVH, length, D]`` keys and values of the pass's rows (views)."""
        m = self.layers[layer][:, : step.span, :, : step.length]
        return m[0], m[1]
