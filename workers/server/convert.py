"""Conversions between the ferry.v1 worker protocol and the engine's typed values.

- Requests in: a ``WorkerGenerateRequest`` becomes an :class:`EngineRequest`. Optional
  sampling fields left unset take :class:`SamplingParams`' defaults; values are validated by
  SamplingParams itself, so a bad value raises InvalidRequestError with its message.
- Outputs out: a :class:`RequestOutput` delta becomes one ``WorkerGenerateResponse`` chunk
  (token ids only: the frontend detokenizes). A final ERROR output carries an ``Error``:
  ``INTERNAL`` when an engine step failed, ``ABORTED`` when the worker shut down first, and
  ``RESOURCE_EXHAUSTED`` when the engine gave up on the request for lack of KV blocks.
- Counters: engine stats and prefix-cache counters become a ``StatsResponse``.
"""

from __future__ import annotations

from ferry.v1 import common_pb2, worker_pb2
from kvcache.manager import PrefixCacheStats
from workers.engine.engine import EngineStats
from workers.engine.types import EngineRequest, FinishReason, RequestOutput, SamplingParams
from workers.server.async_engine import EngineFailureOutput

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}

_FAILURE_CODE = {
    "internal": common_pb2.ERROR_CODE_INTERNAL,
    "shutdown": common_pb2.ERROR_CODE_ABORTED,
}

ROLE_TO_PROTO = {
    "aggregated": common_pb2.WORKER_ROLE_AGGREGATED,
    "prefill": common_pb2.WORKER_ROLE_PREFILL,
    "decode": common_pb2.WORKER_ROLE_DECODE,
}


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """SamplingParams from the wire; unset optional fields keep the engine's defaults."""
    kwargs: dict = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if msg.stop:
        kwargs["stop"] = tuple(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    if msg.ignore_eos:
        kwargs["ignore_eos"] = True
    return SamplingParams(**kwargs)


def engine_request_from_proto(req: worker_pb2.WorkerGenerateRequest) -> EngineRequest:
    """The engine request of a Generate call; InvalidRequestError on a bad sampling value."""
    sampling = sampling_from_proto(req.sampling) if req.HasField("sampling") else SamplingParams()
    return EngineRequest(request_id=req.request_id,
                         prompt_token_ids=tuple(req.prompt_token_ids), sampling=sampling)


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return _FINISH_TO_PROTO[reason]


def error_code_of(out: RequestOutput) -> int:
    """The ErrorCode of a final ERROR output (see the module docstring)."""
    if isinstance(out, EngineFailureOutput):
        return _FAILURE_CODE.get(out.code, common_pb2.ERROR_CODE_INTERNAL)
    return common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED


def chunk_from_output(out: RequestOutput) -> worker_pb2.WorkerGenerateResponse:
    """One Generate stream chunk carrying ``out``'s new tokens (and its end, if final)."""
    chunk = worker_pb2.WorkerGenerateResponse(
        request_id=out.request_id,
        new_token_ids=out.new_token_ids,
        finished=out.finished,
        finish_reason=_FINISH_TO_PROTO[out.finish_reason],
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
    )
    if out.finish_reason is FinishReason.ERROR:
        chunk.error.code = error_code_of(out)
        chunk.error.message = out.error or "the request failed on the worker"
    return chunk


def stats_to_proto(worker_id: str, stats: EngineStats, prefix: PrefixCacheStats,
                   integrity_detail: str | None) -> worker_pb2.StatsResponse:
    """``integrity_detail`` None means the self-check passed."""
    return worker_pb2.StatsResponse(
        worker_id=worker_id,
        num_waiting=stats.num_waiting,
        num_running=stats.num_running,
        kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_total=stats.kv_blocks_total,
        active_prefill_tokens=stats.num_active_prefill_tokens,
        prefix_hit_tokens=prefix.hit_tokens,
        prefix_query_tokens=prefix.queried_tokens,
        integrity_ok=integrity_detail is None,
        integrity_detail=integrity_detail or "",
    )


def role_to_proto(role: str) -> int:
    try:
        return ROLE_TO_PROTO[role]
    except KeyError:
        raise ValueError(f"unknown worker role {role!r}; use one of {sorted(ROLE_TO_PROTO)}") \
            from None


__all__ = [
    "ROLE_TO_PROTO",
    "chunk_from_output",
    "engine_request_from_proto",
    "error_code_of",
    "finish_reason_to_proto",
    "role_to_proto",
    "sampling_from_proto",
    "stats_to_proto",
]
