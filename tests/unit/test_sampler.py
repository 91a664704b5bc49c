"""Sampler: greedy is argmax, top_k=1 is greedy, tiny top_p is argmax, filters keep exactly the
tokens they should, and a seeded draw depends only on (seed, step, logits)."""

from __future__ import annotations

import pytest
import torch

from workers.engine import sampler
from workers.engine.sampler import sample, sampling_probs
from workers.engine.types import InvalidRequestError, SamplingParams, ScheduledSeq

V = 50


def seq(params: SamplingParams, rid: str = "r", n_out: int = 0) -> ScheduledSeq:
    return ScheduledSeq(
        request_id=rid,
        token_ids=(1,),
        start_pos=0,
        block_table=(0,),
        sample=True,
        sampling=params,
        num_output_tokens=n_out,
        is_prefill=False,
    )


def logits_batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = logits_batch(6)
    out = sample(logits, [seq(SamplingParams(temperature=0.0))] * 6)
    assert out == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_argmax():
    logits = logits_batch(5, seed=1)
    expected = logits.argmax(-1).tolist()
    assert sample(logits, [seq(SamplingParams(temperature=1.3, top_k=1))] * 5) == expected
    for seed in range(5):
        params = SamplingParams(temperature=2.0, top_p=1e-6, seed=seed)
        assert sample(logits, [seq(params)] * 5) == expected


def test_mixed_greedy_and_random_rows():
    logits = logits_batch(4, seed=2)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=2, seed=4),
    ]
    out = sample(logits, [seq(p, f"r{i}") for i, p in enumerate(params)])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    assert out[3] in logits[3].topk(2).indices.tolist()


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    probs = sampling_probs(logits, [SamplingParams(top_k=2), SamplingParams(top_p=0.75)])
    assert torch.allclose(probs[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(probs[1], torch.tensor([0.625, 0.375, 0.0, 0.0]))  # 0.5 < 0.75 <= 0.5+0.3
    probs = sampling_probs(logits, [SamplingParams(top_p=0.81), SamplingParams(temperature=2.0)])
    assert (probs[0] > 0).tolist() == [True, True, True, False]
    flat = torch.softmax(logits[1] / 2.0, -1)
    assert torch.allclose(probs[1], flat)


def reference_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p by a full sort: the definition the sampler must meet."""
    x = row / params.temperature
    ordered, order = x.sort(descending=True)
    keep = torch.ones_like(ordered, dtype=torch.bool)
    if params.top_k:
        keep &= ordered >= ordered[min(params.top_k, len(ordered)) - 1]
    probs = ordered.masked_fill(~keep, float("-inf")).softmax(-1)
    keep &= (probs.cumsum(-1) - probs) < params.top_p
    keep[0] = True
    out = torch.full_like(x, float("-inf"))
    out[order[keep]] = x[order[keep]]
    return out.softmax(-1)


@pytest.mark.parametrize("candidates", [sampler.CANDIDATES, 3])
def test_filters_equal_a_full_sort(candidates, monkeypatch):
    """Mixed rows in one batch; with 3 candidates most top-p sets spill into the full sort."""
    monkeypatch.setattr(sampler, "CANDIDATES", candidates)
    logits = logits_batch(6, seed=4) / 2
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=1.2, top_k=5),
        SamplingParams(temperature=0.5, top_k=7, top_p=0.6),
        SamplingParams(temperature=2.0, top_p=0.99),
        SamplingParams(temperature=1.0, top_k=8, top_p=0.3),
    ]
    probs = sampling_probs(logits, params)
    for row, p in enumerate(params):
        assert torch.allclose(probs[row], reference_probs(logits[row], p), atol=1e-6)


def test_seeded_draws_do_not_depend_on_batch_composition():
    target = torch.randn(V, generator=torch.Generator().manual_seed(9))
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, seed=1234)
    alone = [sample(target[None], [seq(params, n_out=step)])[0] for step in range(12)]
    mates = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=1.0, top_p=0.5),
    ]
    for size in (2, 5):
        batched = []
        for step in range(12):
            others = logits_batch(size - 1, seed=step + size)
            logits = torch.cat([others[: step % size], target[None], others[step % size :]])
            seqs = [seq(mates[i % 4], f"o{i}", n_out=step) for i in range(size - 1)]
            seqs.insert(step % size, seq(params, "me", n_out=step))
            batched.append(sample(logits, seqs)[step % size])
        assert batched == alone
    assert len(set(alone)) > 1  # the step enters the draw
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, seed=4321)
    assert [sample(target[None], [seq(other_seed, n_out=s)])[0] for s in range(12)] != alone


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = [0, 0, 0]
    for step in range(600):
        counts[sample(logits, [seq(SamplingParams(temperature=1.0, seed=11), n_out=step)])[0]] += 1
    assert 360 < counts[0] < 480 and 80 < counts[1] < 160 and 25 < counts[2] < 95


def test_shape_mismatch_is_a_bug():
    with pytest.raises(ValueError, match="need logits"):
        sample(torch.zeros(2, V), [seq(SamplingParams())])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"top_k": -2},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": "x"},
        {"temperature": float("inf")},
    ],
)
def test_invalid_params_raise(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)
