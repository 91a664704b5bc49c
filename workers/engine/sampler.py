"""Next-token sampling for a batch of sequences, each with its own :class:`SamplingParams`.

* Greedy (``temperature == 0`` or ``top_k == 1``): argmax, one vectorized call for all greedy rows.
* Otherwise: logits / temperature, then top-k, then top-p (the smallest set of most likely tokens
  whose probability reaches ``top_p``; the most likely token always stays), then a draw from the
  softmax by inverse CDF. The filters and the draw run vectorized over all sampled rows; the
  filters look at the best 1024 tokens only (no full-vocabulary sort) unless a row's top-p set
  is larger.
* Seeded requests draw with a ``torch.Generator`` seeded from ``(seed, num_output_tokens)``, so
  a draw depends only on the seed, the step and the logits -- never on which other requests
  share the batch. Unseeded rows draw from torch's global generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from workers.engine.types import SamplingParams, ScheduledSeq

CANDIDATES = 1024  # best tokens the top-p filter looks at before falling back to a full sort


def sample(logits: torch.Tensor, seqs: Sequence[ScheduledSeq]) -> list[int]:
    """One token per row of ``logits [N, V]``; row ``i`` belongs to ``seqs[i]``."""
    if logits.dim() != 2 or logits.shape[0] != len(seqs):
        raise ValueError(f"need logits [{len(seqs)}, vocab], got {tuple(logits.shape)}")
    params = [s.sampling for s in seqs]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == len(params):
        return logits.argmax(dim=-1).tolist()
    out = [0] * len(params)
    device = logits.device
    if greedy:
        rows = torch.tensor(greedy, device=device)
        for i, token in zip(greedy, logits.index_select(0, rows).argmax(dim=-1).tolist()):
            out[i] = token
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    probs = sampling_probs(
        logits.index_select(0, torch.tensor(drawn, device=device)), [params[i] for i in drawn]
    )
    uniforms = torch.rand(len(drawn), device=device)  # torch's global generator: unseeded rows
    for row, i in enumerate(drawn):
        seed = params[i].seed
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(step_seed(seed, seqs[i].num_output_tokens))
            uniforms[row] = torch.rand(1, generator=generator, device=device)[0]
    for i, token in zip(drawn, inverse_cdf(probs, uniforms).tolist()):
        out[i] = token
    return out


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row ``r`` -> the first token whose cumulative probability exceeds ``uniforms[r]`` (of the
    row's total): an exact draw from ``probs``; tokens of probability 0 are never drawn."""
    cdf = probs.cumsum(dim=-1)
    targets = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, targets, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, ``[n, V]`` float32. Tokens tied with
    the last one a filter keeps are kept too."""
    x = logits.float()
    temps = torch.tensor([p.temperature for p in params], device=x.device, dtype=torch.float32)
    x = x / temps[:, None]
    vocab = x.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        x = x.masked_fill(x < _thresholds(x, top_k, top_p)[:, None], float("-inf"))
    return x.softmax(dim=-1)


def _thresholds(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Per row, the smallest scaled logit that top-k and then top-p keep.

    Works on the best ``CANDIDATES`` (or top-k) tokens, which holds the answer unless a row's
    top-p set is larger; such rows (flat distributions) fall back to a full sort."""
    vocab = x.shape[-1]
    width = min(vocab, max([CANDIDATES, *(k for k in top_k if k < vocab)]))
    vals, _ = x.topk(width, dim=-1)  # best first
    k = torch.tensor(top_k, device=x.device)
    p = torch.tensor(top_p, device=x.device, dtype=torch.float32)
    in_k = torch.arange(width, device=x.device)[None, :] < k[:, None]
    # top-p measures mass after top-k: normalise over the top-k set (the whole row without top-k)
    whole = torch.logsumexp(x, dim=-1)
    in_set = torch.logsumexp(vals.masked_fill(~in_k, float("-inf")), dim=-1)
    norm = torch.where(k <= width, in_set, whole)
    probs = torch.exp(vals - norm[:, None]).masked_fill(~in_k, 0.0)
    before = probs.cumsum(dim=-1) - probs  # mass ranked above each candidate
    keep = in_k & ((before < p[:, None]) | (p[:, None] >= 1.0))
    keep[:, 0] = True
    last = keep.sum(dim=-1) - 1
    out = vals.gather(1, last[:, None])[:, 0]
    unfiltered = (k > width) & (p >= 1.0)  # rows in the batch that asked for no filter
    out = out.masked_fill(unfiltered, float("-inf"))
    spill = (keep[:, -1] & (k > width) & ~unfiltered).nonzero().flatten().tolist()
    for row in spill:  # the top-p set reaches past the candidates
        out[row] = _full_sort_threshold(x[row], top_p[row])
    return out


def _full_sort_threshold(row: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered = row.sort(descending=True).values
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    count = max(1, int((before < top_p).sum()))
    return ordered[count - 1]


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from a request's seed and how many tokens it has output."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
