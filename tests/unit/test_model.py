"""Our paged-KV Llama against transformers' LlamaForCausalLM on the same tiny random HF folder:
logits over chunked prefill and batched decode, greedy tokens, GQA/MHA, tied/untied, llama3 RoPE."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_model import hf_reference, make_tiny_llama, write_hf_folder
from workers.engine.model_runner import TorchModelRunner
from workers.engine.types import SamplingParams, ScheduledBatch, ScheduledSeq
from workers.loader import load_model
from workers.model import paged_attention
from workers.model.attention_metadata import AttentionMetadata
from workers.model.config import ModelConfig, ModelConfigError

TOL = 1e-4
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)

VARIANTS = {
    "gqa-untied": {"num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": False, "seed": 1},
    "mha-tied": {"num_heads": 4, "num_kv_heads": 4, "tie_word_embeddings": True, "seed": 2},
    "mqa-llama3-rope": {
        "num_heads": 4,
        "num_kv_heads": 1,
        "rope_theta": 500000.0,
        "seed": 3,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    folder = write_hf_folder(
        make_tiny_llama(**VARIANTS[request.param]), tmp_path_factory.mktemp(request.param)
    )
    return load_model(folder), hf_reference(folder)


def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def test_chunked_prefill_then_decode_matches_transformers(pair):
    loaded, ref = pair
    model = loaded.model
    ids = torch.randint(
        3, loaded.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)
    )
    expected = ref_logits(ref, ids.tolist())
    bs = 4
    caches = model.make_kv_caches(num_blocks=12, block_size=bs)
    table = torch.tensor([[7, 2, 10, 0, 5, 11, 3]])  # scattered physical blocks
    got = []
    # two prefill chunks, then decodes (the last one fills its blocks exactly: no padding mask)
    for a, b in ((0, 9), (9, 20), (20, 21), (21, 22), (22, 23), (23, 24)):
        pos = torch.arange(a, b)
        meta = AttentionMetadata(
            query_lens=[b - a],
            seq_lens=[b],
            block_tables=table,
            slot_mapping=table[0, pos // bs] * bs + pos % bs,
            block_size=bs,
        )
        got.append(model.compute_logits(model(ids[a:b], pos, meta, caches)))
    assert (torch.cat(got) - expected).abs().max().item() <= TOL


def _seq(rid, tokens, start, table, sample, n_out=0, prefill=True):
    return ScheduledSeq(
        request_id=rid,
        token_ids=tuple(tokens),
        start_pos=start,
        block_table=tuple(table),
        sample=sample,
        sampling=GREEDY,
        num_output_tokens=n_out,
        is_prefill=prefill,
    )


@pytest.mark.parametrize("group_bytes", [paged_attention.DECODE_GROUP_BYTES, 1])
def test_runner_mixed_batches_match_transformers_greedy(pair, group_bytes, monkeypatch):
    """Two requests: A prefills in two chunks, B joins while A decodes, then both decode in one
    batch (different context lengths; with a 1-byte group budget each decode row is its own
    group, shortest first). Every sampled row's logits and every token must match."""
    monkeypatch.setattr(paged_attention, "DECODE_GROUP_BYTES", group_bytes)
    loaded, ref = pair
    runner = TorchModelRunner(loaded.model, num_blocks=16, block_size=4)
    gen = torch.Generator().manual_seed(5)
    prompt_a = torch.randint(3, loaded.config.vocab_size, (10,), generator=gen).tolist()
    prompt_b = torch.randint(3, loaded.config.vocab_size, (6,), generator=gen).tolist()
    table_a, table_b = (9, 1, 14, 4, 6), (3, 12, 8, 0)
    seqs = {"a": list(prompt_a), "b": list(prompt_b)}

    def step(batch_seqs):
        out = runner.execute(ScheduledBatch(seqs=tuple(batch_seqs), block_size=4, kv_usage=0.5))
        sampled = [s for s in batch_seqs if s.sample]
        assert set(out.sampled) == {s.request_id for s in sampled}
        assert out.duration_s >= 0
        for row, s in enumerate(sampled):
            expected = ref_logits(ref, seqs[s.request_id])[-1]
            assert (runner.last_logits[row] - expected).abs().max().item() <= TOL
            assert out.sampled[s.request_id] == int(expected.argmax())
            seqs[s.request_id].append(out.sampled[s.request_id])

    step([_seq("a", prompt_a[:6], 0, table_a[:2], sample=False)])
    step([_seq("a", prompt_a[6:], 6, table_a[:3], sample=True)])
    step(
        [
            _seq("a", seqs["a"][-1:], 10, table_a[:3], True, 1, prefill=False),
            _seq("b", prompt_b[:4], 0, table_b[:1], sample=False),
        ]
    )
    step(
        [
            _seq("b", prompt_b[4:], 4, table_b[:2], sample=True),  # after a cached prefix
            _seq("a", seqs["a"][-1:], 11, table_a[:3], True, 2, prefill=False),
        ]
    )
    for _ in range(3):
        la, lb = len(seqs["a"]), len(seqs["b"])
        step(
            [
                _seq("b", seqs["b"][-1:], lb - 1, table_b, True, lb - 6, prefill=False),
                _seq("a", seqs["a"][-1:], la - 1, table_a, True, la - 10, prefill=False),
            ]
        )
    with torch.no_grad():
        greedy_a = ref.generate(torch.tensor([prompt_a]), max_new_tokens=6, do_sample=False)[0]
    assert seqs["a"] == greedy_a.tolist()


def test_runner_rejects_batches_that_do_not_fit(pair):
    loaded, _ = pair
    runner = TorchModelRunner(loaded.model, num_blocks=4, block_size=4)
    assert runner.vocab_size == loaded.config.vocab_size
    assert runner.max_model_len == loaded.config.max_position_embeddings
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute(ScheduledBatch((_seq("x", [5] * 6, 0, (1,), True),), 4, 0.1))
    with pytest.raises(ValueError, match="block ids"):
        runner.execute(ScheduledBatch((_seq("x", [5] * 3, 0, (4,), True),), 4, 0.1))
    with pytest.raises(ValueError, match="block_size"):
        runner.execute(ScheduledBatch((_seq("x", [5], 0, (1,), True),), 8, 0.1))
    assert runner.execute(ScheduledBatch((), 4, 0.0)).sampled == {}


def test_kv_cache_layout():
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
    )
    from workers.model.llama import LlamaForCausalLM

    caches = LlamaForCausalLM(cfg).make_kv_caches(num_blocks=5, block_size=8, dtype=torch.float32)
    assert len(caches) == 3
    assert all(c.shape == (2, 40, 2, 4) for c in caches)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"head_dim": 5}, "even"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_theta": float("nan")}, "rope_theta"),
    ],
)
def test_config_validation(change, message):
    base = {
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 4,
    }
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig(**{**base, **change})


def test_config_from_hf_rejects_other_architectures():
    with pytest.raises(ModelConfigError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ModelConfigError, match="rope type 'yarn'"):
        ModelConfig.from_hf_config(
            {
                "model_type": "llama",
                "hidden_size": 16,
                "num_attention_heads": 4,
                "num_hidden_layers": 1,
                "intermediate_size": 8,
                "vocab_size": 10,
                "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
            }
        )
