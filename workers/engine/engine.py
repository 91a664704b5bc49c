"""The engine loop: requests in, a step at a time, token deltas and KV events out.

One :class:`LLMEngine` drives one runner (the torch model runner or the mocker) with the
scheduler and the KV cache manager; it is not thread-safe (one caller steps it).

Protocol of :meth:`LLMEngine.step`:

1. the scheduler picks this step's tokens (see workers.engine.scheduler);
2. the runner computes them and samples one token per sequence that reached its end;
3. the scheduler appends the tokens and applies EOS / stop token / length limits;
4. each request's detokenizer turns its new tokens into text and applies stop strings
   (a match finishes the request at once);
5. the KV events recorded during the step are drained into one batch (at most one per step,
   numbered consecutively from 0).

The step's result holds one :class:`RequestOutput` per request that got a token or finished:
a request aborted (its blocks are freed at once, in :meth:`abort`) or found unable to ever fit
in the cache is reported in the next step with finish reason ABORT or ERROR. Times are on the
runner's clock (wall clock, or the mocker's virtual clock).

Caller mistakes in a request (empty prompt, too long, token ids outside the vocabulary, a
duplicate id, stop strings without a tokenizer) raise InvalidRequestError at
:meth:`add_request`, with a message naming the fix.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.block_pool import blocks_needed
from kvcache.events import KvEventBatch
from kvcache.holds import PinnedBlocks
from kvcache.manager import KVCacheManager
from workers.engine.config import EngineConfig
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.scheduler import Scheduler
from workers.engine.scheduler_types import SchedRequest, TokenUpdate
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    Runner,
)


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float  # 0..1
    num_active_prefill_tokens: int  # tokens still to prefill (waiting + partially prefilled)
    prefix_hit_rate: float  # prompt tokens from the prefix cache at first schedule, 0..1
    num_preemptions: int  # since start


@dataclass(frozen=True)
class StepResult:
    outputs: list[RequestOutput]
    kv_events: KvEventBatch | None
    num_scheduled: int  # sequences in the batch
    num_scheduled_tokens: int
    duration_s: float  # runner clock, from schedule to outputs
    stats: EngineStats


@dataclass(frozen=True)
class FinalOutput:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_cached_tokens: int
    first_token_time: float | None
    finish_time: float
    arrival_time: float | None = None
    error: str | None = None
    pinned: PinnedBlocks | None = None  # pin_prompt requests (see EngineRequest)


class _Tracked:
    __slots__ = ("detok", "req")

    def __init__(self, req: SchedRequest, detok: IncrementalDetokenizer | None) -> None:
        self.req = req
        self.detok = detok


class LLMEngine:
    """Continuous-batching engine over one runner."""

    def __init__(self, runner: Runner, config: EngineConfig, tokenizer=None) -> None:
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.runner = runner
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.resolve_max_model_len(runner.max_model_len)
        self.vocab_size = runner.vocab_size
        self.kv = KVCacheManager(config.num_blocks, config.hash_config,
                                 enable_prefix_caching=config.enable_prefix_caching)
        eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ()) if tokenizer is not None else ()
        self.scheduler = Scheduler(config, self.kv, self.max_model_len, eos)
        self._tracked: dict[str, _Tracked] = {}  # unfinished, or finished and not yet reported
        self._to_report: list[str] = []  # finished outside a step (abort)

    # ---------------------------------------------------------------- requests

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; raise InvalidRequestError (message says what to change)."""
        if not isinstance(request, EngineRequest):
            raise TypeError(f"add_request takes an EngineRequest, got {type(request).__name__}")
        request = self._validate(request)
        arrival = request.arrival_time if request.arrival_time is not None else self.runner.now()
        req = self.scheduler.add(request, arrival)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                           stop=request.sampling.stop)
        self._tracked[req.request_id] = _Tracked(req, detok)

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its blocks are freed now; the next step reports it (ABORT).

        Returns False when no unfinished request has this id.
        """
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.req.finished:
            return False
        self.scheduler.finish(request_id, FinishReason.ABORT)
        self._to_report.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        """True while a request is queued, running, or finished but not reported yet."""
        return bool(self._tracked)

    # ---------------------------------------------------------------- stepping

    def step(self) -> StepResult:
        runner = self.runner
        start = runner.now()
        sched = self.scheduler.schedule()
        batch = sched.batch
        updates: list[TokenUpdate] = []
        if batch.seqs:
            result = runner.execute(batch)
            updates = self.scheduler.update(batch, result, runner.now())
        now = runner.now()
        outputs = [self._token_output(u) for u in updates]
        for rid in list(sched.failed) + self._to_report:
            outputs.append(self._final_output(rid))
        self._to_report = []
        events = self.kv.drain_events(now)
        return StepResult(
            outputs=outputs,
            kv_events=events,
            num_scheduled=len(batch.seqs),
            num_scheduled_tokens=batch.num_prefill_tokens + batch.num_decode_tokens,
            duration_s=now - start,
            stats=self.stats(),
        )

    def generate(self, requests: Sequence[EngineRequest]) -> list[FinalOutput]:
        """Add ``requests``, step until all of them finished; results in the same order."""
        ids = [r.request_id for r in requests]
        added: list[str] = []
        try:
            for r in requests:
                self.add_request(r)
                added.append(r.request_id)
        except Exception:
            for rid in added:
                self.abort(rid)
            raise
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        final: dict[str, FinalOutput] = {}
        while len(final) < len(ids):
            res = self.step()
            if not res.outputs and res.num_scheduled == 0:
                raise RuntimeError(
                    f"engine made no progress with {len(ids) - len(final)} request(s) "
                    "unfinished (scheduler bug); stats: " + repr(res.stats))
            for out in res.outputs:
                if out.request_id not in tokens or out.request_id in final:
                    continue
                tokens[out.request_id].extend(out.new_token_ids)
                texts[out.request_id].append(out.new_text)
                if out.finished:
                    final[out.request_id] = FinalOutput(
                        request_id=out.request_id,
                        token_ids=tuple(tokens[out.request_id]),
                        text="".join(texts[out.request_id]),
                        finish_reason=out.finish_reason,
                        num_prompt_tokens=out.num_prompt_tokens,
                        num_cached_tokens=out.num_cached_tokens,
                        first_token_time=out.first_token_time,
                        pinned=out.pinned,
                        finish_time=self.runner.now(),
                        arrival_time=out.arrival_time,
                        error=out.error,
                    )
        return [final[rid] for rid in ids]

    # ---------------------------------------------------------------- state

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv
        return EngineStats(
            num_waiting=s.num_waiting,
            num_running=s.num_running,
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_total=kv.num_blocks,
            kv_usage=kv.usage,
            num_active_prefill_tokens=s.num_active_prefill_tokens(),
            prefix_hit_rate=s.prefix_hit_rate,
            num_preemptions=s.num_preemptions,
        )

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (scheduler, KV cache)."""
        self.scheduler.check_integrity()
        for rid, tracked in self._tracked.items():
            if tracked.req.finished:
                if rid not in self._to_report:
                    raise AssertionError(f"finished request {rid!r} is never reported")
            elif self.scheduler.get(rid) is not tracked.req:
                raise AssertionError(f"request {rid!r} is tracked but not scheduled")
        for rid in self.scheduler.running_ids() + self.scheduler.waiting_ids():
            if rid not in self._tracked:
                raise AssertionError(f"scheduled request {rid!r} is not tracked")

    # ---------------------------------------------------------------- internals

    def _validate(self, request: EngineRequest) -> EngineRequest:
        """The request with its prompt as a tuple of Python ints, or InvalidRequestError."""
        rid = request.request_id
        if not isinstance(rid, str) or not rid:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {rid!r}")
        if rid in self._tracked:
            raise InvalidRequestError(
                f"request id {rid!r} is already in use; give every request a unique request_id")
        prompt = request.prompt_token_ids
        if len(prompt) == 0:
            raise InvalidRequestError("the prompt is empty; send at least one prompt token")
        n = len(prompt)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but max_model_len is {self.max_model_len}; "
                f"shorten the prompt to at most {self.max_model_len - 1} tokens to leave room "
                "for the output")
        vocab = self.vocab_size
        # Fast path (long prompts): a tuple of plain ints in range needs no per-token checks.
        plain = type(prompt) is tuple and all(type(t) is int for t in prompt)
        for i, t in enumerate(() if plain and 0 <= min(prompt) and max(prompt) < vocab
                              else prompt):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise InvalidRequestError(
                    f"prompt token ids must be integers; position {i} holds {t!r}")
            if not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"prompt token id {t} at position {i} is outside the vocabulary [0, {vocab}); "
                    "tokenize the prompt with this model's tokenizer")
        bs, total = self.config.block_size, self.config.num_blocks
        need = blocks_needed(n, bs)
        if need > total:
            raise InvalidRequestError(
                f"the prompt needs {need} KV blocks of {bs} tokens but this worker's cache has "
                f"only {total}; shorten the prompt or start the worker with more KV blocks")
        if request.sampling.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer but this engine has none; use stop_token_ids "
                "instead, or start the engine with a tokenizer")
        if not plain:
            request = dataclasses.replace(request, prompt_token_ids=tuple(int(t) for t in prompt))
        return request

    def _token_output(self, update: TokenUpdate) -> RequestOutput:
        tracked = self._tracked[update.request_id]
        reason = update.finish_reason
        text = ""
        if tracked.detok is not None:
            delta = tracked.detok.add_tokens(update.new_token_ids, final=reason is not None)
            text = delta.text
            if delta.stop is not None:
                if reason is None:
                    self.scheduler.finish(update.request_id, FinishReason.STOP)
                reason = tracked.req.finish_reason = FinishReason.STOP
        return self._output(tracked, update.new_token_ids, text, reason)

    def _final_output(self, request_id: str) -> RequestOutput:
        tracked = self._tracked[request_id]
        text = tracked.detok.flush().text if tracked.detok is not None else ""
        return self._output(tracked, (), text, tracked.req.finish_reason)

    def _output(self, tracked: _Tracked, new_tokens: tuple[int, ...], text: str,
                reason: FinishReason | None) -> RequestOutput:
        req = tracked.req
        if reason is not None:
            del self._tracked[req.request_id]
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_tokens,
            new_text=text,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens or 0,
            num_output_tokens=req.num_output_tokens,
            first_token_time=req.first_token_time,
            arrival_time=req.arrival_time,
            error=req.error if reason is FinishReason.ERROR else None,
            pinned=req.pinned if reason is not None else None,
        )


__all__ = ["EngineStats", "FinalOutput", "LLMEngine", "StepResult"]
