"""The pure core of disaggregated routing: worker pools, the local / remote prefill decision
and its reasons (step 2 of :mod:`router.disagg`, which applies it in
:class:`~router.disagg.DisaggRouter`).

Pools (:class:`PoolRole`): ``prefill`` workers only prefill and hand their blocks over;
``decode`` workers decode (and prefill locally when told to); ``both`` workers are aggregated
ones. The decode pool is the ``decode`` and ``both`` workers, the prefill pool the ``prefill``
workers.

Local or remote (:func:`plan_prefill`, reasons :class:`DisaggReason`), for a prompt of
``prompt_len`` tokens once the decode worker is chosen, in this order:

- no prefill worker to choose from -> local, ``no_prefill_worker``;
- ``uncached_tokens = prompt_len - overlap_blocks(decode worker) * block_size`` is at most
  ``max_local_prefill_tokens`` -> local, ``short_prefill`` (a short prefill costs the decode
  worker less than a second hop and a KV transfer cost the request);
- the prefill pool is busy -> local, ``prefill_busy``: its mean queued prefill per worker
  (``sum(queued_prefill_blocks) * block_size / len(pool)`` tokens) is above
  ``max_prefill_queue_tokens``, or every prefill worker is busy by the cost config's own
  test (:func:`router.cost.is_busy`: KV usage, queued prefill);
- otherwise remote, ``long_prefill``.

``prefill_failed`` is not decided here: the frontend reports it (:meth:`router.disagg.
DisaggRouter.on_prefill_failed`) when the prefill worker failed and the decode worker prefills
locally.

Pure: no I/O, no state; the same arguments give the same plan.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from router.cost import CostConfig, is_busy
from router.types import WorkerLoad


class PoolRole(str, enum.Enum):
    """A worker's role (the values of ``workers.server.worker.WorkerRole``)."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "aggregated"

    @property
    def decodes(self) -> bool:
        return self is not PoolRole.PREFILL


class DisaggReason(str, enum.Enum):
    """Why a request's prompt is prefilled where it is (a ``/metrics`` label value)."""

    LONG_PREFILL = "long_prefill"  # remote: the uncached part is long, the prefill pool free
    SHORT_PREFILL = "short_prefill"  # local: the uncached part is short
    PREFILL_BUSY = "prefill_busy"  # local: the prefill pool is busy
    NO_PREFILL_WORKER = "no_prefill_worker"  # local: no prefill worker to choose from
    PREFILL_FAILED = "prefill_failed"  # local: the prefill worker failed (the frontend's fallback)

    @property
    def remote(self) -> bool:
        return self is DisaggReason.LONG_PREFILL

    @property
    def choice(self) -> str:
        """``remote`` or ``local`` (a ``/metrics`` label value)."""
        return "remote" if self.remote else "local"


@dataclass(frozen=True)
class DisaggConfig:
    """
    - ``max_local_prefill_tokens`` (default 512): a prompt whose uncached part on the chosen
      decode worker is at most this many tokens is prefilled there. 512 tokens are one short
      forward pass (a few decode steps' time on a GPU): cheaper than a second hop plus a KV
      transfer. 0: every prompt with an uncached token goes to a prefill worker (Dynamo calls
      this knob ``max_local_prefill_length``).
    - ``max_prefill_queue_tokens`` (default 16384): the prefill pool is busy when its queued
      prefill per worker, in tokens, is above this: two full batches of the engine's default
      8192-token budget waiting on every prefill worker. None: never busy by queue length
      (workers busy by the cost config's own test still are).
    """

    max_local_prefill_tokens: int = 512
    max_prefill_queue_tokens: int | None = 16384

    def __post_init__(self) -> None:
        v = self.max_local_prefill_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"max_local_prefill_tokens must be an integer >= 0 (0: prefill "
                             f"every uncached prompt remotely), got {v!r}")
        q = self.max_prefill_queue_tokens
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise ValueError(f"max_prefill_queue_tokens must be an integer >= 1, or None to "
                             f"never count the prefill pool as busy by its queue; got {q!r}")


@dataclass(frozen=True)
class PrefillPlan:
    """The module docstring's decision: where the prompt is prefilled, and why."""

    reason: DisaggReason
    uncached_tokens: int  # prompt tokens the decode worker does not hold
    queued_tokens_per_prefill_worker: float  # the prefill pool's mean queue (0: no pool)

    @property
    def remote(self) -> bool:
        return self.reason.remote


def plan_prefill(prompt_len: int, block_size: int, decode_overlap_blocks: int,
                 prefill_loads: Sequence[WorkerLoad], cost: CostConfig, config: DisaggConfig
                 ) -> PrefillPlan:
    """Local or remote prefill (see the module docstring). ``prefill_loads``: the prefill
    workers to choose from (empty: none)."""
    if prompt_len < 1 or block_size < 1 or decode_overlap_blocks < 0:
        raise ValueError(f"plan_prefill needs prompt_len >= 1, block_size >= 1 and overlap >= 0; "
                         f"got {prompt_len}, {block_size}, {decode_overlap_blocks}")
    uncached = max(prompt_len - decode_overlap_blocks * block_size, 0)
    if not prefill_loads:
        return PrefillPlan(DisaggReason.NO_PREFILL_WORKER, uncached, 0.0)
    queued = sum(ld.queued_prefill_blocks for ld in prefill_loads) * block_size \
        / len(prefill_loads)
    if uncached <= config.max_local_prefill_tokens:
        reason = DisaggReason.SHORT_PREFILL
    elif (config.max_prefill_queue_tokens is not None
          and queued > config.max_prefill_queue_tokens) \
            or all(is_busy(ld, cost) for ld in prefill_loads):
        reason = DisaggReason.PREFILL_BUSY
    else:
        reason = DisaggReason.LONG_PREFILL
    return PrefillPlan(reason, uncached, queued)


__all__ = [
    "DisaggConfig",
    "DisaggReason",
    "PoolRole",
    "PrefillPlan",
    "plan_prefill",
]
