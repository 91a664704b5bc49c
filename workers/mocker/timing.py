"""How long the mocker says a forward pass takes (no model weights involved).

Two fitted curves, in milliseconds:

- prefill: ``prefill_ms(T) = a*T**2 + b*T + c`` for ``T`` prompt tokens computed in one pass
  (the quadratic term is attention over the new tokens);
- decode: ``decode_ms(u) = max(1, p*u**2 + q*u + r)`` for one decode step of the whole batch,
  ``u`` the share of KV blocks in use (0..1) after scheduling: decode is memory bound, so its
  cost follows how much KV the pass reads.

A pass (one :class:`~workers.engine.types.ScheduledBatch`) costs:

- prefill tokens only: ``prefill_ms(T)`` with ``T`` the sum of the tokens of all its prefill
  sequences (chunks and recomputes included);
- decode sequences only: ``decode_ms(u)`` (once, whatever the number of sequences);
- both (chunked prefill mixed with decodes): ``prefill_ms(T) + decode_ms(u)``;
- nothing scheduled: 0.

The total is divided by ``speedup`` (> 0; 2.0 models hardware twice as fast) and returned in
seconds by :meth:`TimingModel.batch_seconds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from workers.engine.types import ScheduledBatch


@dataclass(frozen=True)
class TimingModel:
    a: float = 4.209989e-7  # prefill ms per token squared
    b: float = 1.518344e-2  # prefill ms per token
    c: float = 16.50142  # prefill ms per pass
    p: float = -25.74  # decode ms per usage squared
    q: float = 54.01  # decode ms per usage
    r: float = 5.74  # decode ms at an empty cache
    speedup: float = 1.0  # divides every modelled time

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"timing coefficient {f.name} must be a finite number, "
                                 f"got {value!r}")
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0 (1.0 = as fitted), got {self.speedup!r}")

    def prefill_ms(self, num_tokens: int) -> float:
        """Un-sped-up prefill time of ``num_tokens`` new tokens in one pass."""
        t = num_tokens
        return self.a * t * t + self.b * t + self.c

    def decode_ms(self, kv_usage: float) -> float:
        """Un-sped-up time of one decode step at KV usage ``kv_usage`` (clamped to 0..1)."""
        u = min(max(kv_usage, 0.0), 1.0)
        return max(1.0, self.p * u * u + self.q * u + self.r)

    def pass_ms(self, num_prefill_tokens: int, num_decode_seqs: int, kv_usage: float) -> float:
        """Time of one pass, speedup applied (see the module docstring)."""
        ms = 0.0
        if num_prefill_tokens > 0:
            ms += self.prefill_ms(num_prefill_tokens)
        if num_decode_seqs > 0:
            ms += self.decode_ms(kv_usage)
        return ms / self.speedup

    def batch_seconds(self, batch: ScheduledBatch) -> float:
        num_decode = sum(1 for s in batch.seqs if not s.is_prefill)
        return self.pass_ms(batch.num_prefill_tokens, num_decode, batch.kv_usage) / 1000.0


__all__ = ["TimingModel"]
