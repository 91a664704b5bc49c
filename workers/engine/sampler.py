"""Next-token sampling for a batch of sequences, each with its own :class:`SamplingParams`.

* Greedy (``temperature == 0`` or ``top_k == 1``): argmax, one vectorized call for all greedy rows.
* Otherwise: logits / temperature, then top-k, then top-p (the smallest set of most likely tokens
  whose probability reaches ``top_p``; the most likely token always stays), then a draw from the
  softmax. The filters run vectorized over all sampled rows.
* Seeded requests draw with a ``torch.Generator`` seeded from ``(seed, num_output_tokens)``, so
  a draw depends only on the seed, the step and the logits -- never on which other requests
  share the batch. Unseeded rows draw from torch's global generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from workers.engine.types import SamplingParams, ScheduledSeq


def sample(logits: torch.Tensor, seqs: Sequence[ScheduledSeq]) -> list[int]:
    """One token per row of ``logits [N, V]``; row ``i`` belongs to ``seqs[i]``."""
    if logits.dim() != 2 or logits.shape[0] != len(seqs):
        raise ValueError(f"need logits [{len(seqs)}, vocab], got {tuple(logits.shape)}")
    params = [s.sampling for s in seqs]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == len(params):
        return logits.argmax(dim=-1).tolist()
    out = [0] * len(params)
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        for i, token in zip(greedy, logits.index_select(0, rows).argmax(dim=-1).tolist()):
            out[i] = token
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    probs = sampling_probs(
        logits[torch.tensor(random_rows, device=logits.device)], [params[i] for i in random_rows]
    )
    for row, i in enumerate(random_rows):
        out[i] = _draw(probs[row], params[i], seqs[i].num_output_tokens)
    return out


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, ``[n, V]`` float32."""
    x = logits.float()
    temps = torch.tensor([p.temperature for p in params], device=x.device, dtype=torch.float32)
    x = x / temps[:, None]
    vocab = x.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_x, order = x.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_x, dtype=torch.bool)
        if any(top_k):
            k = torch.tensor([k or vocab for k in top_k], device=x.device)
            kth = sorted_x.gather(1, (k - 1)[:, None])
            remove |= sorted_x < kth  # ties with the k-th value stay
        if any(p < 1.0 for p in top_p):
            probs = sorted_x.masked_fill(remove, float("-inf")).softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
            p = torch.tensor(top_p, device=x.device, dtype=torch.float32)
            remove |= before >= p[:, None]
        remove[:, 0] = False
        x = x.scatter(1, order, sorted_x.masked_fill(remove, float("-inf")))
    return x.softmax(dim=-1)


def _draw(probs: torch.Tensor, params: SamplingParams, step: int) -> int:
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=probs.device)
        generator.manual_seed(step_seed(params.seed, step))
    return int(torch.multinomial(probs, 1, generator=generator))


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from a request's seed and how many tokens it has output."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
