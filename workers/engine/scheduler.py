"""Continuous batching with chunked prefill and preemption by recompute (pure logic, no torch).

Each engine step is ``schedule()`` -> runner ``execute(batch)`` -> ``update(batch, output)``.
The request record and the step results (:class:`SchedRequest`, :class:`SchedulerOutput`,
:class:`TokenUpdate`) are in :mod:`workers.engine.scheduler_types`.

schedule(), under a token budget of ``max_num_batched_tokens`` and at most ``max_num_seqs``
running requests:

1. Running requests, oldest arrival first. Each gets its next uncomputed tokens: one for a
   decode (the token sampled last step), or the next chunk of a prompt still being
   prefilled (as much as the budget has left; the rest continues next step). When the KV
   manager cannot give a request the blocks it needs, the most recently arrived running
   request is preempted by recompute (its blocks are freed, it goes to the front of the
   waiting queue, and its next prefill recomputes prompt + outputs so far), repeatedly,
   until the allocation fits or the request preempted itself.
2. Waiting requests in FCFS order (preempted ones are at the front), only if nobody was
   preempted this step: look up the computed prefix in the prefix cache, then allocate
   blocks for the prefix plus as much of the rest as the budget allows. A request that does
   not fit waits (and the ones behind it too: strict FCFS).

A request whose known tokens need more blocks than the whole cache holds can never run: it
finishes with FinishReason.ERROR and an error message instead of waiting forever (the engine
rejects such prompts at add time; this catches sequences that grew into it).

update(), after the runner: every sequence whose pass reached its last known token gets the
sampled token appended; then the stop conditions are checked, in this order: EOS (unless
``ignore_eos``), ``stop_token_ids`` (both STOP, the token is kept), ``max_tokens``, and
``max_model_len`` (both LENGTH). A finished request's blocks are freed at once. Stop strings
are the engine's business (they need the detokenized text): it calls :meth:`Scheduler.finish`.

Token accounting: ``num_computed_tokens`` counts tokens whose KV is computed, advanced at
schedule time (the runner computes them in the same step, so they count as computed for the
KV manager's next call). A running request always has uncomputed tokens: after a sampling
pass it holds ``computed == len(all_token_ids) - 1``.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable

from kvcache.block_pool import blocks_needed
from kvcache.manager import KVCacheManager
from workers.engine.config import EngineConfig
from workers.engine.scheduler_types import (
    RequestStatus,
    SchedRequest,
    SchedulerOutput,
    TokenUpdate,
    _arrival_order,
)
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    RunnerOutput,
    ScheduledBatch,
    ScheduledSeq,
)


class Scheduler:
    """Decides, step by step, which tokens of which requests the runner computes."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int,
                 eos_token_ids: Iterable[int] = ()) -> None:
        if kv.block_size != config.block_size or kv.num_blocks != config.num_blocks:
            raise ValueError(
                f"KV manager has {kv.num_blocks} blocks of {kv.block_size} tokens but the "
                f"config says {config.num_blocks} of {config.block_size}; build both from "
                "the same EngineConfig")
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, SchedRequest] = {}
        self._waiting: deque[SchedRequest] = deque()
        self._running: list[SchedRequest] = []  # sorted by arrival order
        self._next_order = 0
        self.num_preemptions = 0
        self._first_sched_prompt_tokens = 0
        self._first_sched_cached_tokens = 0

    # ---------------------------------------------------------------- requests

    def add(self, request: EngineRequest, arrival_time: float) -> SchedRequest:
        """Queue a (validated) request at the back of the waiting queue."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        req = SchedRequest(request, arrival_time, self._next_order)
        self._next_order += 1
        self._requests[req.request_id] = req
        req.cached_estimate = self.kv.get_computed_prefix(req.request_id,
                                                          req.all_token_ids).num_tokens
        self._waiting.append(req)
        return req

    def get(self, request_id: str) -> SchedRequest | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def finish(self, request_id: str, reason: FinishReason, error: str | None = None) -> bool:
        """Finish an unfinished request now (abort, stop string): free its blocks at once."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.RUNNING:
            self._running.remove(req)
        else:
            self._waiting.remove(req)
        self._finish(req, reason, error)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self._waiting]

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self._running]

    def num_active_prefill_tokens(self) -> int:
        """Tokens still to prefill: waiting requests' sequences less the prefix the cache held
        when they were queued, and the rest of running ones."""
        n = sum(len(r.all_token_ids) - r.cached_estimate for r in self._waiting)
        n += sum(len(r.all_token_ids) - r.num_computed_tokens
                 for r in self._running if not r.prefill_done)
        return n

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache at first schedule / prompt tokens."""
        seen = self._first_sched_prompt_tokens
        return self._first_sched_cached_tokens / seen if seen else 0.0

    # ---------------------------------------------------------------- one step

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        kv = self.kv
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        failed: list[str] = []

        i = 0
        while i < len(self._running) and budget > 0:
            req = self._running[i]
            if self._never_fits(req):
                self._running.pop(i)
                failed.append(req.request_id)
                continue
            known = len(req.all_token_ids)
            num_new = min(known - req.num_computed_tokens, budget)
            assert num_new > 0, f"running request {req.request_id!r} has nothing to compute"
            table = kv.allocate_slots(req.request_id, req.all_token_ids, num_new)
            while table is None:
                victim = self._running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
                table = kv.allocate_slots(req.request_id, req.all_token_ids, num_new)
            if table is None:
                break  # preempted itself, and everyone after it
            seqs.append(self._scheduled(req, num_new, table))
            budget -= num_new
            i += 1

        while (not preempted and self._waiting and budget > 0
               and len(self._running) < self.config.max_num_seqs):
            req = self._waiting[0]
            if self._never_fits(req):
                self._waiting.popleft()
                failed.append(req.request_id)
                continue
            prefix = kv.get_computed_prefix(req.request_id, req.all_token_ids)
            num_new = min(len(req.all_token_ids) - prefix.num_tokens, budget)
            table = kv.allocate_slots(req.request_id, req.all_token_ids, num_new, prefix)
            if table is None:
                break  # strict FCFS: the head waits, so does everyone behind it
            self._waiting.popleft()
            if req.num_cached_tokens is None:
                req.num_cached_tokens = prefix.num_tokens
                self._first_sched_prompt_tokens += req.num_prompt_tokens
                self._first_sched_cached_tokens += prefix.num_tokens
            req.num_computed_tokens = prefix.num_tokens
            req.status = RequestStatus.RUNNING
            bisect.insort(self._running, req, key=_arrival_order)
            seqs.append(self._scheduled(req, num_new, table))
            budget -= num_new

        batch = ScheduledBatch(seqs=tuple(seqs), block_size=self.config.block_size,
                               kv_usage=kv.usage)
        return SchedulerOutput(batch, tuple(preempted), tuple(failed))

    def update(self, batch: ScheduledBatch, output: RunnerOutput, now: float) -> list[TokenUpdate]:
        """Append the sampled tokens, check stop conditions, free finished requests."""
        updates: list[TokenUpdate] = []
        for seq in batch.seqs:
            if not seq.sample:
                continue
            req = self._requests.get(seq.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished (aborted) since it was scheduled
            try:
                token = output.sampled[seq.request_id]
            except KeyError:
                raise RuntimeError(
                    f"the runner returned no token for request {seq.request_id!r}, which was "
                    "scheduled with sample=True") from None
            req.all_token_ids.append(token)
            req.prefill_done = True
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._running.remove(req)
                self._finish(req, reason)
            updates.append(TokenUpdate(req.request_id, (token,), reason))
        return updates

    # ---------------------------------------------------------------- checks

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (KV manager included)."""
        kv = self.kv
        kv.check_integrity()
        running_ids = [r.request_id for r in self._running]
        waiting_ids = [r.request_id for r in self._waiting]
        if len(set(running_ids)) != len(running_ids) or len(set(waiting_ids)) != len(waiting_ids):
            raise AssertionError(f"duplicate ids: running {running_ids}, waiting {waiting_ids}")
        if set(running_ids) & set(waiting_ids):
            raise AssertionError(f"requests both running and waiting: "
                                 f"{sorted(set(running_ids) & set(waiting_ids))}")
        if set(running_ids) | set(waiting_ids) != set(self._requests):
            raise AssertionError("the request table does not match the running + waiting queues")
        if len(self._running) > self.config.max_num_seqs:
            raise AssertionError(f"{len(self._running)} running > max_num_seqs "
                                 f"{self.config.max_num_seqs}")
        orders = [r.order for r in self._running]
        if orders != sorted(orders):
            raise AssertionError(f"running queue is not in arrival order: {running_ids}")
        for r in self._running:
            if r.status is not RequestStatus.RUNNING or not kv.has_request(r.request_id):
                raise AssertionError(f"running request {r.request_id!r} holds no KV blocks")
            held = kv.num_computed_tokens(r.request_id)
            if held != r.num_computed_tokens or held > len(r.all_token_ids):
                raise AssertionError(
                    f"request {r.request_id!r}: KV manager holds {held} tokens, scheduler "
                    f"counts {r.num_computed_tokens} of {len(r.all_token_ids)} known")
        for r in self._waiting:
            if r.status is not RequestStatus.WAITING or kv.has_request(r.request_id) \
                    or r.num_computed_tokens != 0:
                raise AssertionError(f"waiting request {r.request_id!r} holds KV blocks")
        for r in self._requests.values():
            if len(r.all_token_ids) > self.max_model_len:
                raise AssertionError(f"request {r.request_id!r} is longer than max_model_len")
        held = kv.holds.num_blocks()  # pinned for handles, reserved for imports
        if not self._running and kv.num_used_blocks != held:
            raise AssertionError(f"{kv.num_used_blocks - held} KV blocks in use with nothing "
                                 "running (besides holds)")

    # ---------------------------------------------------------------- internals

    def _scheduled(self, req: SchedRequest, num_new: int, table: tuple[int, ...]
                   ) -> ScheduledSeq:
        start = req.num_computed_tokens
        end = start + num_new
        req.num_computed_tokens = end
        return ScheduledSeq(
            request_id=req.request_id,
            token_ids=tuple(req.all_token_ids[start:end]),
            start_pos=start,
            block_table=table,
            sample=end == len(req.all_token_ids),
            sampling=req.sampling,
            num_output_tokens=req.num_output_tokens,
            is_prefill=not req.prefill_done,
        )

    def _never_fits(self, req: SchedRequest) -> bool:
        """Finish ``req`` with ERROR when its known tokens need more blocks than exist."""
        n = len(req.all_token_ids)
        need = blocks_needed(n, self.config.block_size)
        if need <= self.config.num_blocks:
            return False
        self._finish(req, FinishReason.ERROR, (
            f"request {req.request_id!r} needs {need} KV blocks for {n} tokens (block size "
            f"{self.config.block_size}) but the cache has only {self.config.num_blocks}; "
            "raise num_blocks, or lower max_tokens or max_model_len"))
        return True

    def _preempt(self, req: SchedRequest) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.prefill_done = False
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.cached_estimate = self.kv.get_computed_prefix(req.request_id,
                                                          req.all_token_ids).num_tokens
        self._waiting.appendleft(req)

    def _finish(self, req: SchedRequest, reason: FinishReason, error: str | None = None) -> None:
        """Mark finished and free (the caller took it out of its queue); a ``pin_prompt``
        request that ends normally pins its full prompt blocks first."""
        if req.pin_prompt and reason in (FinishReason.STOP, FinishReason.LENGTH) \
                and self.kv.has_request(req.request_id):
            req.pinned = self.kv.pin_prompt(req.request_id, req.prompt_token_ids)
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.error = error
        del self._requests[req.request_id]

    def _stop_reason(self, req: SchedRequest, token: int) -> FinishReason | None:
        sp = req.sampling
        if not sp.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if token in sp.stop_token_ids:
            return FinishReason.STOP
        if req.num_output_tokens >= sp.max_tokens:
            return FinishReason.LENGTH
        if len(req.all_token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None


__all__ = ["RequestStatus", "SchedRequest", "Scheduler", "SchedulerOutput", "TokenUpdate"]
