"""Attention over the paged KV cache, for one flattened batch of new tokens.

Cache layout (``attention_metadata.py``): per layer ``[2, num_blocks * block_size, KVH, D]``.
A pass first writes the new tokens' K/V into their slots (:func:`write_kv`), then attends:

* Decode rows (one new token) with a decode mirror (``decode_mirror.py``, given by the model
  runner): each layer appends the new K/V to the rows' contiguous copies and one SDPA call runs
  all rows over them in place, ``[n, KVH, L, D]``, no gather. The ``G = H / KVH`` query heads
  sharing a KV head are folded into SDPA's query axis, so K/V are never repeated.
* Decode rows without a mirror (or more than it may hold) are batched the same way over a
  gather: their blocks (keys and values, one index_select over the cache seen as
  ``[2 * num_blocks, block]``) are copied into a reusable workspace, padded to the longest
  context of the group with a padding mask. Rows are grouped (shortest contexts together) so
  that a group's gathered K/V stays within a cache-sized budget: on a 2-core CPU the second
  read of K/V then comes from cache rather than memory, and short rows are not padded to long
  ones. (Measured on a 2-core, 32 MB-L3 CPU: 10 MB groups beat one big gather by 25 % at 32
  rows of 512 tokens; below the budget one group is fastest.)
* A single decode row on CPU (decode at batch 1) runs without forking the OpenMP team: the
  product with the keys, the softmax and the product with the values are matrix-vector
  products and element-wise ops, which torch runs on the calling thread at these sizes; its
  K/V are its mirror row, or a view of the cache when its blocks are consecutive, or else
  gathered in chunks small enough to copy on the calling thread. SDPA would fork the team once
  per layer; on a CPU shared with other processes every fork waits for a core to come free
  (measured on a busy 2-core machine: several milliseconds per fork, for microseconds of work;
  a batch-1 step went from 1065 to 238 ms), and on an idle one the fork-free path costs about
  as much as SDPA.
* Each prefill chunk runs its own SDPA call: a chunk at position 0 attends over its own K/V
  with ``is_causal``; a chunk after a cached prefix gathers its context and uses a causal mask
  shifted by the prefix length.

:func:`build_plan` turns the metadata into index tensors and masks once per pass (and plans
the mirror's rows); every layer reuses them (and the workspace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.attention_metadata import AttentionMetadata
from workers.model.decode_mirror import DecodeEntry, DecodeMirror, MirrorStep

DECODE_GROUP_BYTES = 10 << 20  # gathered K+V per decode group (stays in a small CPU's cache)
# Elements torch copies on the calling thread before it forks (ATen's at::internal::GRAIN_SIZE)
_SERIAL_GRAIN = 32768
_LOG2E = math.log2(math.e)


@dataclass
class DecodeGroup:
    tokens: torch.Tensor | None  # [n] indices into the flattened input; None: all tokens, in order
    rows: torch.Tensor  # [2 * n * nb] rows of the cache as [2 * num_blocks, block]: K then V
    mask: torch.Tensor | None  # [n, 1, 1, length] additive (0 / -inf); None: no padding
    padded: int  # nb * block_size: tokens gathered per sequence
    length: int  # tokens attended per sequence (the context when all are equal, else padded)
    single_start: int | None = None  # one row, consecutive blocks: its first slot (no gather)
    single: bool = False  # one row on CPU: the fork-free path


@dataclass
class PrefillChunk:
    start: int  # first token in the flattened input
    end: int
    context_len: int  # seq_len after this pass
    rows: torch.Tensor | None  # K then V rows of the context's blocks; None: no cached prefix
    mask: torch.Tensor | None  # [query_len, context_len] additive (0 / -inf); None: plain causal


@dataclass
class AttentionPlan:
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    block_size: int
    workspace: torch.Tensor  # flat buffer the gathers of every layer reuse
    workspace_numel: int  # what the largest gather needs
    mirror: DecodeMirror | None = None  # decode rows read the mirror (then no decode groups)
    mirror_step: MirrorStep | None = None
    mirror_tokens: torch.Tensor | None = None  # decode rows' tokens; None: all, in order


def build_plan(meta: AttentionMetadata, cache: torch.Tensor) -> AttentionPlan:
    """Index tensors and masks for ``meta``; the caller fills in ``workspace``."""
    bs = meta.block_size
    if bs <= 0 or cache.shape[1] % bs:
        raise ValueError(
            f"KV cache of {cache.shape[1]} slots is not a whole number of {bs}-token blocks"
        )
    device = cache.device
    num_blocks = cache.shape[1] // bs
    tables = meta.block_tables.to(device)
    decode: list[tuple[int, int, int]] = []  # (seq_len, row, token index)
    prefills: list[PrefillChunk] = []
    start = 0
    for row, (qlen, slen) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        if qlen <= 0 or slen < qlen:
            raise ValueError(
                f"sequence {row}: query_len {qlen} and seq_len {slen} are inconsistent"
            )
        if -(-slen // bs) > tables.shape[1]:
            raise ValueError(f"sequence {row}: block table too short for {slen} tokens")
        if qlen == 1:
            decode.append((slen, row, start))
        else:
            prefix, rows, mask = slen - qlen, None, None
            if prefix:
                rows = _kv_rows(tables[row, : -(-slen // bs)], num_blocks)
                q_pos = torch.arange(prefix, slen, device=device)
                mask = _additive(
                    torch.arange(slen, device=device)[None, :] <= q_pos[:, None], cache.dtype
                )
            prefills.append(PrefillChunk(start, start + qlen, slen, rows, mask))
        start += qlen
    per_token = 2 * cache.shape[2] * cache.shape[3] * cache.element_size()
    mirror_plan = _mirror_plan(meta, decode, tables, num_blocks, all_tokens=len(decode) == start)
    if mirror_plan is not None:
        decode = []
    groups = _decode_groups(
        decode, tables, bs, num_blocks, per_token, cache.dtype, all_tokens=len(decode) == start
    )
    gathered = [g.rows.shape[0] for g in groups if g.single_start is None] + [
        c.rows.shape[0] for c in prefills if c.rows is not None
    ]
    numel = max(gathered, default=0) * bs * cache.shape[2] * cache.shape[3]
    plan = AttentionPlan(groups, prefills, bs, cache.new_empty(0), numel)
    if mirror_plan is not None:
        plan.mirror, (plan.mirror_step, plan.mirror_tokens) = meta.mirror, mirror_plan
    return plan


def _mirror_plan(
    meta: AttentionMetadata,
    decode: list[tuple[int, int, int]],
    tables: torch.Tensor,
    num_blocks: int,
    all_tokens: bool,
) -> tuple[MirrorStep, torch.Tensor | None] | None:
    """The mirror's plan for the decode rows (None: no mirror, or it cannot hold them)."""
    if meta.mirror is None or meta.seq_ids is None:
        return None
    if not decode:
        meta.mirror.clear()  # a row lives only across consecutive decode passes
        return None
    bs = meta.block_size
    table_rows = meta.block_tables.tolist()
    entries = [
        DecodeEntry(meta.seq_ids[row], slen, tuple(table_rows[row][: -(-slen // bs)]))
        for slen, row, _ in decode
    ]
    step = meta.mirror.plan(entries, bs, num_blocks)
    if step is None:
        return None
    in_order = all_tokens and [d[2] for d in decode] == list(range(len(decode)))
    tokens = None if in_order else torch.tensor([d[2] for d in decode], device=tables.device)
    return step, tokens


def _kv_rows(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Rows of the cache seen as ``[2 * num_blocks, block]`` holding ``blocks``: K, then V."""
    return torch.cat((blocks, blocks + num_blocks))


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask as an additive float mask (SDPA converts a bool mask on every call)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
        ~keep, float("-inf")
    )


def _decode_groups(
    decode: list[tuple[int, int, int]],
    tables: torch.Tensor,
    bs: int,
    num_blocks: int,
    per_token: int,
    dtype: torch.dtype,
    all_tokens: bool,
) -> list[DecodeGroup]:
    if not decode:
        return []
    longest = -(-max(d[0] for d in decode) // bs) * bs
    members = [decode]
    if len(decode) * longest * per_token > DECODE_GROUP_BYTES:
        decode = sorted(decode)  # shortest first: similar lengths share a group, little padding
        padded = sum(-(-d[0] // bs) * bs for d in decode) * per_token
        count = min(len(decode), -(-padded // DECODE_GROUP_BYTES))
        size = -(-len(decode) // count)
        members = [decode[i : i + size] for i in range(0, len(decode), size)]
    device = tables.device
    groups = []
    for group in members:
        lens = [d[0] for d in group]
        nb = -(-max(lens) // bs)
        rows = torch.tensor([d[1] for d in group], device=device)
        blocks = tables.index_select(0, rows)[:, :nb].reshape(-1)
        in_order = (
            all_tokens and len(members) == 1 and [d[2] for d in group] == list(range(len(group)))
        )
        tokens = None if in_order else torch.tensor([d[2] for d in group], device=device)
        if len(group) == 1 and device.type == "cpu":
            first = int(blocks[0])
            consecutive = blocks.numel() == 1 or bool(
                (blocks == torch.arange(first, first + nb, device=device)).all()
            )
            groups.append(
                DecodeGroup(
                    tokens, _kv_rows(blocks, num_blocks), None, nb * bs, lens[0],
                    single_start=first * bs if consecutive else None, single=True,
                )
            )
            continue
        mask, length = None, nb * bs
        if min(lens) == max(lens):
            length = lens[0]  # attend over a view of exactly the context: nothing to mask
        else:
            lens_t = torch.tensor(lens, device=device)
            keep = torch.arange(nb * bs, device=device)[None, :] < lens_t[:, None]
            mask = _additive(keep, dtype).view(len(group), 1, 1, nb * bs)
        groups.append(DecodeGroup(tokens, _kv_rows(blocks, num_blocks), mask, nb * bs, length))
    return groups


def write_kv(cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    cache[0].index_copy_(0, slots, k)
    cache[1].index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    plan: AttentionPlan,
    layer: int = 0,
) -> torch.Tensor:
    """``q [T, H, D]`` and this pass's ``k``/``v [T, KVH, D]`` (already in ``cache``, the KV
    cache of layer ``layer``) -> attention output ``[T, H * D]``."""
    T, H, D = q.shape
    kvh = k.shape[1]
    groups = plan.decode_groups
    if len(groups) == 1 and groups[0].tokens is None:
        return _attend_decode(q, cache, groups[0], plan, kvh).reshape(T, H * D)
    if plan.mirror_step is not None and plan.mirror_tokens is None and not plan.prefills:
        return _attend_mirror(q, k, v, cache, plan, layer).reshape(T, H * D)
    out = q.new_empty(T, H * D)
    if plan.mirror_step is not None:
        rows = plan.mirror_tokens
        o = _attend_mirror(q[rows], k[rows], v[rows], cache, plan, layer)
        out.index_copy_(0, rows, o.reshape(rows.shape[0], H * D))
    for group in groups:
        qg = q.index_select(0, group.tokens)
        o = _attend_decode(qg, cache, group, plan, kvh)
        out.index_copy_(0, group.tokens, o.reshape(qg.shape[0], H * D))
    for chunk in plan.prefills:
        n = chunk.end - chunk.start
        if chunk.rows is None:
            kc, vc = k[chunk.start : chunk.end], v[chunk.start : chunk.end]
        else:
            kv = _gather(cache, chunk.rows, plan).view(2, -1, kvh, D)[:, : chunk.context_len]
            kc, vc = kv[0], kv[1]
        # 4-D [1, heads, tokens, D]: CPU SDPA is several times slower on 3-D inputs
        o = F.scaled_dot_product_attention(
            q[None, chunk.start : chunk.end].transpose(1, 2),
            kc[None].transpose(1, 2),
            vc[None].transpose(1, 2),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            enable_gqa=H != kvh,
        )
        out[chunk.start : chunk.end] = o[0].transpose(0, 1).reshape(n, H * D)
    return out


def _attend_mirror(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    plan: AttentionPlan,
    layer: int,
) -> torch.Tensor:
    """Decode rows ``q [n, H, D]`` (with their new ``k``/``v``) over the mirror -> ``[n, H, D]``."""
    mirror, step = plan.mirror, plan.mirror_step
    assert mirror is not None and step is not None
    mirror.fill(layer, cache, step, plan.block_size)
    mirror.write(layer, k, v, step)
    keys, values = mirror.kv(layer, step)  # [span, KVH, length, D]
    n, H, D = q.shape
    kvh = keys.shape[1]
    if n == 1 and q.device.type == "cpu":
        row = 0 if step.q_rows is None else int(step.q_rows[0])
        length = step.length
        return _attend_one(
            q[0], keys[row, :, :length].unbind(0), values[row, :, :length].transpose(1, 2).unbind(0)
        )[None]
    qm = q
    if step.q_rows is not None:
        qm = q.new_zeros(step.span, H, D).index_copy_(0, step.q_rows, q)
    o = F.scaled_dot_product_attention(  # [span, KVH, G, D] == [span, H, D]
        qm.view(step.span, kvh, H // kvh, D), keys, values, attn_mask=step.mask
    )
    return o if step.q_rows is None else o.index_select(0, step.q_rows)


def _attend_decode(
    q: torch.Tensor, cache: torch.Tensor, group: DecodeGroup, plan: AttentionPlan, kvh: int
) -> torch.Tensor:
    n, H, D = q.shape
    if group.single:
        L = group.length
        if group.single_start is not None:
            kv = cache[:, group.single_start : group.single_start + L]
        else:
            kv = _gather(cache, group.rows, plan, serial=True).view(2, group.padded, kvh, D)
            kv = kv[:, :L]
        # keys: KVH x [L, D]; values: KVH x [D, L]
        return _attend_one(q[0], kv[0].unbind(1), kv[1].permute(1, 2, 0).unbind(0))[None]
    kv = _gather(cache, group.rows, plan).view(2, n, group.padded, kvh, D)[:, :, : group.length]
    return F.scaled_dot_product_attention(  # [n, KVH, G, D] == [n, H, D]
        q.reshape(n, kvh, H // kvh, D),
        kv[0].transpose(1, 2),
        kv[1].transpose(1, 2),
        attn_mask=group.mask,
    )


def _attend_one(
    q: torch.Tensor, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """One decode row with no OpenMP fork (see the module doc): ``q [H, D]``, per KV head
    ``keys [L, D]`` and ``values [D, L]`` -> ``[H, D]``."""
    H, D = q.shape
    per_kv = H // len(keys)
    # softmax(q.k / sqrt(D)) as 2^(x - max) with log2(e) folded into the query scale
    qs = (q * (_LOG2E / math.sqrt(D))).unbind(0)
    scores = torch.stack([torch.mv(keys[h // per_kv], qs[h]) for h in range(H)])
    scores.sub_(scores.amax(-1, keepdim=True)).exp2_()
    probs = scores.div_(scores.sum(-1, keepdim=True)).unbind(0)
    return torch.stack([torch.mv(values[h // per_kv], probs[h]) for h in range(H)])


def _gather(
    cache: torch.Tensor, rows: torch.Tensor, plan: AttentionPlan, serial: bool = False
) -> torch.Tensor:
    """Blocks ``rows`` of the cache seen as ``[2 * num_blocks, block_size * KVH * D]``, copied
    into the pass's workspace (a fresh buffer per layer would cost more in page faults than the
    copy). ``serial``: in chunks torch copies on the calling thread."""
    view = cache.view(2 * (cache.shape[1] // plan.block_size), -1)
    n, width = rows.shape[0], view.shape[1]
    out = plan.workspace[: n * width].view(n, width)
    step = max(1, _SERIAL_GRAIN // width) if serial else n
    for i in range(0, n, step):
        torch.index_select(view, 0, rows[i : i + step], out=out[i : i + step])
    return out
