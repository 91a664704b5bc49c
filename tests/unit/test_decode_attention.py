"""Decode attention paths against a plain reference computed from the paged cache: batched
gather + SDPA, the fork-free single-row path (blocks consecutive or scattered), and the decode
mirror (rows kept across steps, joins, sequences leaving, holes moved down, capacity growth,
the byte limit), alone and mixed with prefill chunks."""

from __future__ import annotations

import math

import pytest
import torch

from workers.model import decode_mirror, paged_attention
from workers.model.attention_metadata import AttentionMetadata
from workers.model.decode_mirror import DecodeMirror
from workers.model.paged_attention import build_plan, write_kv

H, KVH, D, BS, NUM_BLOCKS = 6, 2, 8, 4, 64
TOL = 1e-5


class Sim:
    """Sequences with block tables over one layer's paged cache, stepped like a runner."""

    def __init__(self, mirror: DecodeMirror | None, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.cache = torch.zeros(2, NUM_BLOCKS * BS, KVH, D)
        self.free = torch.randperm(NUM_BLOCKS, generator=self.gen).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}
        self.mirror = mirror

    def step(self, work: list[tuple[str, int]]) -> None:
        """Run one pass: ``(seq id, new tokens)`` in batch order; check every output row."""
        seq_lens, rows, slots = [], [], []
        for sid, n in work:
            start = self.lens.get(sid, 0)
            end = start + n
            table = self.tables.setdefault(sid, [])
            while len(table) * BS < end:
                table.append(self.free.pop())
            seq_lens.append(end)
            slots += [table[p // BS] * BS + p % BS for p in range(start, end)]
            self.lens[sid] = end
        width = max(len(self.tables[sid]) for sid, _ in work)
        tables = torch.zeros(len(work), width, dtype=torch.int64)
        for i, (sid, _) in enumerate(work):
            tables[i, : len(self.tables[sid])] = torch.tensor(self.tables[sid])
        T = len(slots)
        q = torch.randn(T, H, D, generator=self.gen)
        k = torch.randn(T, KVH, D, generator=self.gen)
        v = torch.randn(T, KVH, D, generator=self.gen)
        meta = AttentionMetadata(
            [n for _, n in work], seq_lens, tables, torch.tensor(slots), BS,
            seq_ids=tuple(sid for sid, _ in work) if self.mirror else None, mirror=self.mirror,
        )
        write_kv(self.cache, meta.slot_mapping, k, v)
        plan = build_plan(meta, self.cache)
        plan.workspace = self.cache.new_empty(max(plan.workspace_numel, 1))
        out = paged_attention.paged_attention(q, k, v, self.cache, plan)
        rows = 0
        for sid, n in work:
            want = reference(q[rows : rows + n], self.cache, self.tables[sid], self.lens[sid])
            got = out[rows : rows + n].view(n, H, D)
            assert (got - want).abs().max().item() <= TOL, sid
            rows += n
        self.plan = plan

    def finish(self, sid: str) -> None:
        self.free += self.tables.pop(sid)
        del self.lens[sid]


def reference(q: torch.Tensor, cache: torch.Tensor, table: list[int], seq_len: int):
    """Causal attention of the last ``len(q)`` positions over the sequence, in float64."""
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(seq_len)])
    keys = cache[0, slots].double().repeat_interleave(H // KVH, dim=1)  # [L, H, D]
    values = cache[1, slots].double().repeat_interleave(H // KVH, dim=1)
    n = q.shape[0]
    scores = torch.einsum("thd,lhd->htl", q.double(), keys) / math.sqrt(D)
    pos = torch.arange(seq_len - n, seq_len)
    scores = scores.masked_fill(torch.arange(seq_len)[None, None, :] > pos[None, :, None], -1e30)
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), values).float()


def new_mirror(max_bytes: int = 1 << 30) -> DecodeMirror:
    return DecodeMirror(1, KVH, D, torch.float32, torch.device("cpu"), max_bytes)


@pytest.mark.parametrize("use_mirror", [False, True])
def test_decode_batches_match_reference(use_mirror, monkeypatch):
    monkeypatch.setattr(decode_mirror, "_MIN_TOKENS", 8)  # grows 8 -> 16 -> 32 in this test
    sim = Sim(new_mirror() if use_mirror else None)
    sim.step([("a", 5), ("b", 9), ("c", 3)])  # prefills
    for _ in range(4):  # decodes of unequal lengths (padding mask)
        sim.step([("a", 1), ("b", 1), ("c", 1)])
    sim.step([("b", 1), ("a", 1), ("c", 1)])  # another order
    sim.finish("a")
    sim.step([("d", 6), ("b", 1), ("c", 1)])  # a prefill next to decodes
    for _ in range(3):
        sim.step([("c", 1), ("d", 1), ("b", 1)])  # d joins
    for _ in range(8):
        sim.step([("b", 1), ("d", 1)])  # c left: a hole
    if use_mirror:
        assert sim.mirror.capacity == 32 and sim.plan.mirror_step is not None


def test_single_row_paths_match_reference():
    sim = Sim(None)
    sim.free = list(range(NUM_BLOCKS))[::-1]  # pop() hands out 0, 1, 2, ...: consecutive blocks
    sim.step([("a", 7)])
    for _ in range(6):
        sim.step([("a", 1)])
        group = sim.plan.decode_groups[0]
        assert group.single and group.single_start == 0  # a view of the cache, no gather
    sim.free = [40, 9]  # the next two blocks are not consecutive
    for _ in range(6):
        sim.step([("a", 1)])
    group = sim.plan.decode_groups[0]
    assert group.single and group.single_start is None
    mirror_sim = Sim(new_mirror())
    mirror_sim.step([("x", 10)])
    for _ in range(5):
        mirror_sim.step([("x", 1)])


def test_mirror_keeps_rows_moves_holes_down_and_refills():
    mirror = new_mirror()
    sim = Sim(mirror)
    ids = [f"s{i}" for i in range(8)]
    sim.step([(s, 3 + i) for i, s in enumerate(ids)])
    sim.step([(s, 1) for s in ids])  # all join
    rows = {s: mirror._rows[s][0] for s in ids}
    assert sorted(rows.values()) == list(range(8))
    sim.step([(s, 1) for s in ids])
    assert {s: mirror._rows[s][0] for s in ids} == rows  # kept
    assert not sim.plan.mirror_step.joiners
    for s in ids[:5]:  # five leave: rows 0..4 become holes under rows 5..7
        sim.finish(s)
    sim.step([(s, 1) for s in ids[5:]])
    assert sorted(mirror._rows[s][0] for s in ids[5:]) == [0, 1, 2]  # moved down (re-joined)
    assert sim.plan.mirror_step.span == 3
    sim.step([(s, 1) for s in ids[5:]])
    assert not sim.plan.mirror_step.joiners
    mirror._rows["s6"] = (mirror._rows["s6"][0], 999, mirror._rows["s6"][2])  # length mismatch
    sim.step([(s, 1) for s in ids[5:]])
    assert [int(r) for r in sim.plan.mirror_step.joiners[0][0]] == [mirror._rows["s6"][0]]


def test_mirror_over_its_byte_limit_falls_back_to_gathering():
    sim = Sim(new_mirror(max_bytes=2 * 8 * KVH * 256 * D * 4 - 1))  # less than 8 rows of 256
    sim.step([("a", 5), ("b", 6)])
    sim.step([("a", 1), ("b", 1)])
    assert sim.plan.mirror_step is None and sim.plan.decode_groups
    assert not sim.mirror._rows


def test_mirror_never_serves_a_finished_sequence_to_a_new_one_with_its_id():
    """A new request reusing an id, the same first block and the same length must not read the
    old request's K/V: a row lives only across consecutive decode passes."""
    sim = Sim(new_mirror())
    sim.step([("x", 6)])
    sim.step([("x", 1)])
    sim.step([("x", 1)])  # the mirror holds 8 tokens of the old x
    first = sim.tables["x"][0]
    sim.finish("x")
    sim.free.remove(first)
    sim.free.append(first)  # handed out first again
    sim.step([("x", 8)])  # the new x: a prefill pass (no decode rows)
    assert sim.tables["x"][0] == first
    sim.step([("x", 1)])  # checked against the reference: the new x's K/V
    assert sim.plan.mirror_step.joiners
