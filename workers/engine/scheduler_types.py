"""The scheduler's records (no torch): its mutable per-request state and what one step returns.

- :class:`SchedRequest`: one request as :class:`~workers.engine.scheduler.Scheduler` tracks it
  from ``add`` to its finish: status (:class:`RequestStatus`), known tokens (prompt + outputs),
  ``num_computed_tokens`` (tokens whose KV is computed, advanced at schedule time), first-token
  time, preemptions, and the prompt blocks pinned at finish for a ``pin_prompt`` request.
- :class:`SchedulerOutput`: what ``schedule()`` returns, the batch for the runner and the ids
  preempted or failed this step.
- :class:`TokenUpdate`: one request's result of ``update()``, the sampled token and whether it
  finished.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvcache.holds import PinnedBlocks
from workers.engine.types import EngineRequest, FinishReason, ScheduledBatch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class SchedRequest:
    """The scheduler's mutable record of one request."""

    __slots__ = (
        "all_token_ids",
        "arrival_time",
        "cached_estimate",
        "error",
        "finish_reason",
        "first_token_time",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "order",
        "pin_prompt",
        "pinned",
        "prefill_done",
        "prompt_token_ids",
        "request_id",
        "sampling",
        "status",
    )

    def __init__(self, request: EngineRequest, arrival_time: float, order: int) -> None:
        self.request_id = request.request_id
        self.prompt_token_ids = tuple(request.prompt_token_ids)
        self.sampling = request.sampling
        self.arrival_time = arrival_time
        self.order = order  # arrival order in this scheduler (FCFS and preemption key)
        self.all_token_ids: list[int] = list(self.prompt_token_ids)  # prompt + outputs
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prompt tokens hit at first schedule
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.first_token_time: float | None = None
        self.prefill_done = False  # sampled since its last (re)admission
        self.num_preemptions = 0
        self.pin_prompt = request.pin_prompt
        self.pinned: PinnedBlocks | None = None  # set at finish when pin_prompt
        # prompt tokens the prefix cache held when it (re)entered the waiting queue: what its
        # prefill will likely skip (an estimate for load reports; the cache may change)
        self.cached_estimate = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(frozen=True)
class SchedulerOutput:
    batch: ScheduledBatch
    preempted: tuple[str, ...]  # request ids preempted this step (newest first)
    failed: tuple[str, ...]  # request ids finished with ERROR this step (can never fit)


@dataclass(frozen=True)
class TokenUpdate:
    """One request's result of a step: the token sampled for it, and whether it finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None


def _arrival_order(req: SchedRequest) -> int:
    """The running queue's sort key (FCFS and preemption order)."""
    return req.order


__all__ = ["RequestStatus", "SchedRequest", "SchedulerOutput", "TokenUpdate"]
