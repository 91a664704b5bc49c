"""The frontend core: prompt in, token and text deltas out. No I/O framework; the OpenAI HTTP,
ferry gRPC and KServe layers are thin adapters around it.

One request (``await Frontend.generate(input)`` then ``async for chunk in stream``):

1. ``generate`` checks the model name, tokenizes (the chat template first for messages),
   validates the sampling values and the length (prompt < max_model_len, prompt + max_tokens
   <= max_model_len) and raises a :class:`FrontendError` saying what to change. It does no
   I/O: a rejected request never reaches a worker.
2. The stream asks the picker for a worker among the ready ones and calls
   ``Worker.Generate``. A worker that answers "no capacity" (RESOURCE_EXHAUSTED) or cannot be
   reached before the first token is left out and another is tried, ``max_attempts`` in all.
   With prefill or decode workers registered, :mod:`orchestrator.frontend.disagg` plans each
   attempt instead: a decode worker (never a prefill worker) and maybe a prefill hop first.
3. Each worker chunk's tokens go through an :class:`IncrementalDetokenizer` (stop strings are
   applied here, not by the worker: the worker gets only stop token ids, with the tokenizer's
   EOS ids added unless ``ignore_eos``). A chunk is yielded per worker chunk with tokens.
4. The last chunk carries the finish reason and usage. On a stop string it is sent at once
   and the worker call is cancelled; a worker failure is a last chunk with an error.
5. Cancelling the consumer (task cancelled, or the iterator closed early) cancels the worker
   call, which ends the request on the worker and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from ferry.v1 import common_pb2, worker_pb2
from orchestrator.frontend.config import FrontendConfig
from orchestrator.frontend.disagg import DisaggPath
from orchestrator.frontend.metrics import (
    STATUS_ABORTED,
    STATUS_CANCELLED,
    STATUS_ERROR,
    STATUS_OK,
    FrontendMetrics,
)
from orchestrator.frontend.pickers import RoundRobin
from orchestrator.frontend.types import (
    Completion,
    ErrorCode,
    FinishReason,
    FrontendError,
    FrontendTokenizer,
    GenerateChunk,
    GenerateInput,
    InvalidArgument,
    ModelNotFound,
    RouteListener,
    RouteRequest,
    StreamError,
    Unavailable,
    Usage,
    WorkerPicker,
    error_code,
)
from orchestrator.frontend.worker_pool import WorkerHandle, WorkerPool
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.types import InvalidRequestError, SamplingParams

_FINISH = {
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
    common_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_STATUS = {FinishReason.STOP: STATUS_OK, FinishReason.LENGTH: STATUS_OK,
           FinishReason.ABORT: STATUS_ABORTED, FinishReason.ERROR: STATUS_ERROR}
_RETRYABLE = (ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE)
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids",
                    "stop")
_OFFLOAD_CHARS = 32_768  # prompts longer than this are tokenized in a thread
_UINT32 = 2**32
_INT64 = 2**63


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str  # what the caller sees
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # the frontend's view (with stop strings)
    worker_request: worker_pb2.WorkerGenerateRequest
    arrival: float  # time.perf_counter() when accepted


class Frontend:
    def __init__(self, tokenizer: FrontendTokenizer, config: FrontendConfig, *,
                 pick_worker: WorkerPicker | None = None, pool: WorkerPool | None = None,
                 metrics: FrontendMetrics | None = None,
                 route_listener: RouteListener | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.pool = pool if pool is not None else WorkerPool(config.worker_timeout_s)
        self.pick_worker: WorkerPicker = pick_worker if pick_worker is not None else RoundRobin()
        self.route_listener = route_listener  # told about workers and routed requests
        self.metrics = metrics if metrics is not None else FrontendMetrics()
        # Prefill / decode workers registered: requests take the two-hop path (disagg.py).
        self.disagg = DisaggPath(self.pool, self.metrics, lambda: self.pick_worker,
                                 config.worker_timeout_s)
        self.created = int(time.time())
        self._vocab_size = tokenizer.vocab_size
        self._eos = tuple(tokenizer.eos_token_ids)
        self._workers_max_len: int | None = None
        # Worker-side request ids: unique across frontend replicas sharing a worker.
        self._id_prefix = f"f{os.urandom(4).hex()}-"
        self._counter = itertools.count()

    # ------------------------------------------------------------------ state

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def max_model_len(self) -> int | None:
        """The configured context length, else the smallest of the workers' (None: unknown)."""
        return self.config.max_model_len or self._workers_max_len

    @property
    def num_ready_workers(self) -> int:
        return len(self.pool.ready_ids)

    @property
    def ready(self) -> bool:
        return bool(self.pool.ready_ids) and self.max_model_len is not None

    def health_detail(self) -> str:
        if self.ready:
            return ""
        if not len(self.pool):
            return f"no worker serving {self.model_name!r} is registered"
        return f"none of the {len(self.pool)} workers serving {self.model_name!r} is ready"

    async def add_worker(self, worker_id: str, address: str) -> WorkerHandle:
        """Register a worker (reads its Info). Raises WorkerUnreachable when it does not
        answer, ValueError when it serves another model or a shorter context than configured."""
        handle = await self.pool.add(worker_id, address)
        info = handle.info
        problem = None
        if info.model != self.model_name:
            problem = (f"worker {worker_id!r} serves model {info.model!r} but this frontend "
                       f"serves {self.model_name!r}")
        elif self.config.max_model_len and info.max_model_len < self.config.max_model_len:
            problem = (f"worker {worker_id!r} has max_model_len {info.max_model_len}, less than "
                       f"the frontend's {self.config.max_model_len}; lower the frontend's "
                       "max_model_len or give the worker a longer context")
        if problem is None and self.route_listener is not None:
            try:
                self.route_listener.worker_added(worker_id, info)
            except ValueError as e:  # e.g. a block size or hash seed the router cannot use
                problem = str(e)
        if problem is not None:
            await self.pool.remove(worker_id)
            raise ValueError(problem)
        self._update_workers()
        return handle

    async def remove_worker(self, worker_id: str) -> bool:
        removed = await self.pool.remove(worker_id)
        if removed and self.route_listener is not None:
            self.route_listener.worker_removed(worker_id)
        self.metrics.forget_worker(worker_id)
        self._update_workers()
        return removed

    async def refresh_worker_stats(self) -> None:
        """Poll every worker's Stats: readiness, and the KV block gauges."""
        for worker_id, stats in (await self.pool.poll_stats()).items():
            self.metrics.worker_load(worker_id, stats.kv_blocks_used, stats.kv_blocks_total)
        self.metrics.ready_workers.set(self.num_ready_workers)

    def _update_workers(self) -> None:
        self.disagg.refresh()
        lens = [h.info.max_model_len for h in self.pool.handles() if h.info.max_model_len]
        self._workers_max_len = min(lens) if lens else None
        self.metrics.ready_workers.set(self.num_ready_workers)

    # ------------------------------------------------------------------ requests

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model", kind="model_not_found")

    def tokenize(self, *, text: str | None = None, messages=None,
                 add_generation_prompt: bool = True) -> tuple[list[int], str]:
        """Token ids and the text they come from, exactly as :meth:`generate` would build
        them (chat: the template's output, without adding special tokens again)."""
        if messages is not None:
            dicts = [{"role": m.role, "content": m.content} for m in messages]
            try:
                rendered = self.tokenizer.apply_chat_template(
                    dicts, add_generation_prompt=add_generation_prompt)
            except InvalidRequestError as e:
                raise InvalidArgument(str(e), param="messages") from None
            return self.tokenizer.encode(rendered, add_special_tokens=False), rendered
        if text is None:
            raise InvalidArgument("give a prompt: text, chat messages or token ids",
                                  param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=True), text

    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerateChunk]:
        """Validate and tokenize (raising FrontendError), then return the chunk stream."""
        try:
            size = len(inp.prompt or "") + sum(len(m.content) for m in inp.messages or ())
            if size > _OFFLOAD_CHARS:
                prep = await asyncio.to_thread(self.prepare, inp)
            else:
                prep = self.prepare(inp)
        except FrontendError as e:
            self.metrics.count(e.code.name.lower())
            raise
        return self._stream(prep)

    async def complete(self, inp: GenerateInput) -> Completion:
        """Run a request to the end and gather its text (non-streaming APIs)."""
        return await collect(await self.generate(inp))

    async def close(self) -> None:
        """Close every worker channel (after the KV handle releases still running)."""
        await self.disagg.close()
        await self.pool.close()

    def prepare(self, inp: GenerateInput) -> PreparedRequest:
        arrival = time.perf_counter()
        self.check_model(inp.model)
        if not self.pool.ready_ids or self.max_model_len is None:
            raise Unavailable(f"no worker is ready to serve {self.model_name!r}; retry once a "
                              "worker has registered", kind="no_worker")
        ids, param = self._prompt_ids(inp)
        if not ids:
            raise InvalidArgument("the prompt is empty after tokenization; send at least one "
                                  "token", param=param)
        n, limit = len(ids), self.max_model_len
        if n >= limit:
            raise InvalidArgument(
                f"the prompt has {n} tokens but the model's context is {limit} tokens (prompt "
                f"and completion together); shorten the prompt to at most {limit - 1} tokens",
                param=param, kind="context_length_exceeded")
        max_tokens = inp.max_tokens
        if max_tokens is None:
            max_tokens = limit - n
            if self.config.default_max_tokens is not None:
                max_tokens = min(max_tokens, self.config.default_max_tokens)
        sampling = self._sampling(inp, max_tokens)
        if n + sampling.max_tokens > limit:
            raise InvalidArgument(
                f"the prompt ({n} tokens) plus max_tokens ({sampling.max_tokens}) is "
                f"{n + sampling.max_tokens} tokens, more than the model's context of {limit}; "
                f"lower max_tokens to at most {limit - n} or shorten the prompt",
                param="max_tokens", kind="context_length_exceeded")
        worker_id = f"{self._id_prefix}{next(self._counter):x}"
        request_id = inp.request_id or worker_id
        stop_ids = list(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.extend(t for t in self._eos if t not in sampling.stop_token_ids)
        pb_sampling = common_pb2.SamplingParams(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, stop_token_ids=stop_ids,
            ignore_eos=sampling.ignore_eos)
        if sampling.seed is not None:
            pb_sampling.seed = sampling.seed
        request = worker_pb2.WorkerGenerateRequest(
            request_id=worker_id, prompt_token_ids=ids, sampling=pb_sampling)
        return PreparedRequest(request_id, tuple(ids), sampling, request, arrival)

    def _prompt_ids(self, inp: GenerateInput) -> tuple[list[int], str]:
        given = sum(x is not None for x in (inp.prompt, inp.messages, inp.prompt_token_ids))
        if given != 1:
            raise InvalidArgument("give exactly one prompt: text, chat messages or token ids",
                                  param="prompt")
        if inp.prompt_token_ids is not None:
            ids = list(inp.prompt_token_ids)
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                   or not 0 <= t < self._vocab_size]
            if bad:
                raise InvalidArgument(
                    f"prompt token ids must be integers in [0, {self._vocab_size}) (the "
                    f"vocabulary size); got {bad[0]!r}", param="prompt")
            return ids, "prompt"
        if inp.messages is not None:
            if not inp.messages:
                raise InvalidArgument("messages is empty; send at least one message",
                                      param="messages")
            return self.tokenize(messages=inp.messages)[0], "messages"
        return self.tokenize(text=inp.prompt)[0], "prompt"

    def _sampling(self, inp: GenerateInput, max_tokens: int) -> SamplingParams:
        values = {"max_tokens": max_tokens, "stop": tuple(inp.stop),
                  "stop_token_ids": tuple(inp.stop_token_ids), "ignore_eos": bool(inp.ignore_eos),
                  "seed": inp.seed}
        for name in ("temperature", "top_p", "top_k"):
            if getattr(inp, name) is not None:
                values[name] = getattr(inp, name)
        try:
            sampling = SamplingParams(**values)
        except InvalidRequestError as e:
            message = str(e)
            param = next((f for f in _SAMPLING_FIELDS if message.startswith(f)), None)
            raise InvalidArgument(message, param=param) from None
        if sampling.seed is not None and not -_INT64 <= sampling.seed < _INT64:
            raise InvalidArgument(f"seed must fit in 64 bits, got {sampling.seed}", param="seed")
        if sampling.top_k >= _UINT32:
            raise InvalidArgument(f"top_k must be below 2**32, got {sampling.top_k}",
                                  param="top_k")
        if any(t >= _UINT32 for t in sampling.stop_token_ids):
            raise InvalidArgument("stop_token_ids must be below 2**32", param="stop_token_ids")
        return sampling

    # ------------------------------------------------------------------ the stream

    async def _stream(self, prep: PreparedRequest) -> AsyncIterator[GenerateChunk]:
        m = self.metrics
        rid = prep.request_id
        route_id = prep.worker_request.request_id  # unique across frontend replicas
        listener = self.route_listener
        detok = IncrementalDetokenizer(self.tokenizer, prep.prompt_token_ids,
                                       stop=prep.sampling.stop)
        n_prompt, n_out, n_cached = len(prep.prompt_token_ids), 0, 0
        last = 0.0
        tried: list[str] = []
        recorded = False

        def final(ids, text, reason, error=None) -> GenerateChunk:
            nonlocal recorded
            recorded = True
            m.finished(_STATUS[reason], n_prompt, n_out, n_cached)
            return GenerateChunk(rid, ids, text, reason, Usage(n_prompt, n_out, n_cached), error)

        m.in_flight.inc()
        try:
            while True:
                candidates = self.pool.ready_ids
                disagg = self.disagg.active
                if disagg:  # prefill workers never take a request themselves
                    candidates = self.disagg.decode_candidates(candidates)
                if tried:
                    candidates = tuple(w for w in candidates if w not in tried)
                if not candidates:
                    yield final((), "", FinishReason.ERROR, StreamError(
                        ErrorCode.UNAVAILABLE, f"no worker could take the request (tried "
                        f"{', '.join(tried) or 'none'}); retry later"))
                    return
                route = RouteRequest(route_id, prep.prompt_token_ids, candidates)
                if disagg:  # the hook: a decode worker and maybe a prefill hop before it
                    worker_id, call = self.disagg.open(prep, route)
                else:
                    worker_id, call = self.pick_worker(route), None
                if worker_id not in self.pool:
                    yield final((), "", FinishReason.ERROR, StreamError(
                        ErrorCode.INTERNAL, f"the worker picker chose {worker_id!r}, which is "
                        "not registered"))
                    return
                tried.append(worker_id)
                can_retry = len(tried) < self.config.max_attempts
                if call is None:
                    call = self.pool.get(worker_id).generate(prep.worker_request)
                ended = False  # the worker's stream is over: nothing to cancel
                try:
                    async for msg in call:
                        ids = msg.new_token_ids
                        if ids:
                            now = time.perf_counter()
                            if n_out:
                                m.itl.observe((now - last) / len(ids))
                            else:
                                m.ttft.observe(now - prep.arrival)
                                n_cached = msg.num_cached_tokens
                                if listener is not None:
                                    listener.first_token(route_id)
                            last = now
                            n_out += len(ids)
                            ids = tuple(ids)
                        else:
                            ids = ()
                        if msg.finished:
                            ended = True
                            n_cached = msg.num_cached_tokens
                            reason = _FINISH.get(msg.finish_reason, FinishReason.ERROR)
                            if reason is FinishReason.ERROR:
                                code = error_code(msg.error.code)
                                if not n_out and can_retry and code in _RETRYABLE:
                                    break
                                yield final(ids, "", reason, StreamError(
                                    code, f"worker {worker_id}: {msg.error.message}"))
                                return
                            delta = detok.add_tokens(ids, final=True)
                            if delta.stop is not None:
                                reason = FinishReason.STOP
                            yield final(ids, delta.text, reason)
                            return
                        if not ids:
                            continue
                        delta = detok.add_tokens(ids)
                        if delta.stop is not None:  # the finally below cancels the call
                            yield final(ids, delta.text, FinishReason.STOP)
                            return
                        yield GenerateChunk(rid, ids, delta.text)
                    else:
                        ended = True
                        yield final((), "", FinishReason.ERROR, StreamError(
                            ErrorCode.INTERNAL,
                            f"worker {worker_id} closed the stream without a final chunk"))
                        return
                except grpc.aio.AioRpcError as e:
                    ended = True
                    code = error_code(e.code().value[0])
                    if not (not n_out and can_retry and code in _RETRYABLE):
                        yield final((), "", FinishReason.ERROR, StreamError(
                            code, f"worker {worker_id} failed: {e.code().name}: {e.details()}"))
                        return
                finally:
                    if not ended:
                        call.cancel()
        finally:
            m.in_flight.dec()
            if listener is not None and tried:
                listener.finished(route_id)
            if not recorded:
                m.finished(STATUS_CANCELLED, n_prompt, n_out, n_cached)


async def collect(stream: AsyncIterator[GenerateChunk]) -> Completion:
    """Consume a chunk stream to its last chunk and gather it into one Completion."""
    parts: list[str] = []
    ids: list[int] = []
    last = None
    async with aclosing(stream):
        async for last in stream:
            parts.append(last.text)
            ids.extend(last.token_ids)
    if last is None or last.finish_reason is None or last.usage is None:
        raise RuntimeError("a generation stream ended without its final chunk")
    return Completion(last.request_id, "".join(parts), tuple(ids), last.finish_reason,
                      last.usage, last.error)


__all__ = ["Frontend", "PreparedRequest", "collect"]
