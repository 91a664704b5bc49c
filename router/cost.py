"""The cost function: which worker should take a request, given prefix overlap and load.

For a prompt of ``prompt_blocks`` blocks (``ceil(prompt_len / block_size)``: the partial tail
is always computed) and a worker holding its first ``overlap`` blocks:

    uncached = prompt_blocks - overlap                       # blocks this worker would compute
    cost     = prefill_weight * (uncached + queued_prefill_blocks)
             + decode_weight  * decode_blocks

``queued_prefill_blocks`` (prompt work ahead of this request) and ``decode_blocks`` (blocks of
running requests: each decode step reads them all) come from :class:`~router.types.WorkerLoad`.
The cost is an estimate of the wait for the first token, in units of "one prompt block to
prefill": engines schedule first come first served, so a new request's first token comes after
every queued prompt block and its own uncached ones. Decode blocks delay it far less: a decode
step reads each block once, and the steps that prefill the request carry the running decodes
along (with the issue's timing model a prompt block costs about 1 ms to prefill, while 1,000
decode blocks add about 3 ms to a step, and a long prompt is prefilled in steps of
``max_num_batched_tokens``). Hence the default ``decode_weight`` of 0.1, ten times below the
prefill weight: it still breaks near-ties towards workers decoding less (shorter inter-token
latency, and room in their caches), without sending a request away from its cached prefix
because of the decoding going on there. On the synthetic trace (8 workers, ``ferry replay
--offline``) 0.1 cut the mean TTFT at 4x speed by a quarter against 1.0, with higher reuse;
0.03 to 0.1 performed alike.

Choice:

1. A worker is *busy* when its KV usage is at or above ``busy_kv_usage`` or its queued prefill
   is at or above ``busy_prefill_blocks`` (either check off when None). Busy workers are
   skipped, unless every worker is busy: then all are candidates (the least costly wins).
2. ``temperature == 0``: the candidate with the lowest cost wins; equal lowest costs are broken
   by ``rng.choice`` over them (in the order given), the only time the rng is used.
3. ``temperature > 0``: candidate ``i`` is drawn with probability proportional to
   ``exp(-x_i / temperature)``, ``x_i = (cost_i - min) / (max - min)`` (0 for all when the
   costs are equal): the temperature is relative to the spread of costs, so at 1.0 the costliest
   candidate is e times less likely than the cheapest, whatever the units. One
   ``rng.random()`` draw.

Pure functions: the same inputs and rng state give the same choice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.types import WorkerCost, WorkerLoad


@dataclass(frozen=True)
class CostConfig:
    prefill_weight: float = 1.0
    decode_weight: float = 0.1  # per decode block, in prefill blocks (see the docstring)
    temperature: float = 0.0  # 0: argmin; > 0: softmax sampling (see the module docstring)
    busy_kv_usage: float | None = 0.95  # skip workers at or above this KV usage (0..1]
    busy_prefill_blocks: float | None = None  # skip workers with this much prefill queued

    def __post_init__(self) -> None:
        for name in ("prefill_weight", "decode_weight", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"CostConfig.{name} must be a finite number >= 0, got {v!r}")
        u = self.busy_kv_usage
        if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float))
                              or not 0 < u <= 1):
            raise ValueError(f"CostConfig.busy_kv_usage must be in (0, 1] or None (no limit), "
                             f"got {u!r}")
        b = self.busy_prefill_blocks
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))
                              or not 0 < b < math.inf):
            raise ValueError(f"CostConfig.busy_prefill_blocks must be a number > 0 or None "
                             f"(no limit), got {b!r}")


@dataclass(frozen=True)
class CostChoice:
    chosen: WorkerCost
    num_candidates: int  # workers that were not busy (all of them when all were busy)
    all_busy: bool


def is_busy(load: WorkerLoad, config: CostConfig) -> bool:
    u, b = config.busy_kv_usage, config.busy_prefill_blocks
    return (u is not None and load.kv_blocks_total > 0
            and load.kv_blocks_used >= u * load.kv_blocks_total) \
        or (b is not None and load.queued_prefill_blocks >= b)


def worker_cost(prompt_blocks: int, overlap_blocks: int, load: WorkerLoad, config: CostConfig
                ) -> WorkerCost:
    """The full breakdown for one worker (the formula of the module docstring)."""
    uncached = max(prompt_blocks - overlap_blocks, 0)
    cost = config.prefill_weight * (uncached + load.queued_prefill_blocks) \
        + config.decode_weight * load.decode_blocks
    return WorkerCost(load.worker_id, overlap_blocks, uncached, load.queued_prefill_blocks,
                      load.decode_blocks, load.kv_usage, is_busy(load, config), cost)


def softmax_weights(costs: Sequence[float], temperature: float) -> list[float]:
    """Sampling weights (summing to 1) for ``temperature > 0``: see the module docstring."""
    if not temperature > 0:
        raise ValueError(f"softmax needs a temperature > 0, got {temperature!r}")
    lo, hi = min(costs), max(costs)
    if hi == lo:
        return [1.0 / len(costs)] * len(costs)
    scale = 1.0 / ((hi - lo) * temperature)
    w = [math.exp(-(c - lo) * scale) for c in costs]
    total = sum(w)
    return [x / total for x in w]


def choose_worker(prompt_blocks: int, overlaps: Mapping[str, int], loads: Sequence[WorkerLoad],
                  config: CostConfig, rng: random.Random) -> CostChoice:
    """Pick a worker for a prompt of ``prompt_blocks`` blocks (see the module docstring).

    ``overlaps``: leading blocks held per worker id (absent: 0). ``loads``: the workers to
    choose from, in a fixed order (it decides which tie ``rng.choice`` picks).
    """
    if not loads:
        raise ValueError("choose_worker needs at least one worker")
    pw, dw = config.prefill_weight, config.decode_weight
    u, b = config.busy_kv_usage, config.busy_prefill_blocks
    get = overlaps.get
    costs: list[float] = []
    free: list[int] = []
    for i, ld in enumerate(loads):  # the formula of worker_cost, inlined: this runs per worker
        q = ld.queued_prefill_blocks
        costs.append(pw * (max(prompt_blocks - get(ld.worker_id, 0), 0) + q)
                     + dw * ld.decode_blocks)
        total = ld.kv_blocks_total
        if not ((u is not None and total > 0 and ld.kv_blocks_used >= u * total)
                or (b is not None and q >= b)):
            free.append(i)
    all_busy = not free
    cands = range(len(loads)) if all_busy else free
    if config.temperature == 0:
        best = min(costs[i] for i in cands)
        tied = [i for i in cands if costs[i] == best]
        pick = tied[0] if len(tied) == 1 else rng.choice(tied)
    else:
        weights = softmax_weights([costs[i] for i in cands], config.temperature)
        x = rng.random()
        pick = cands[-1]
        for i, wgt in zip(cands, weights, strict=True):
            x -= wgt
            if x < 0:
                pick = i
                break
    ld = loads[pick]
    return CostChoice(worker_cost(prompt_blocks, get(ld.worker_id, 0), ld, config),
                      len(cands), all_busy)
