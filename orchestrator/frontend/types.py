"""Typed values at the frontend's seams: what the API layers (OpenAI HTTP, ferry gRPC, KServe)
hand to the :class:`~orchestrator.frontend.core.Frontend`, what it streams back, and the
errors it raises before a stream starts.

Error protocol: a request the caller must change (bad value, prompt too long, unknown model)
is rejected with a :class:`FrontendError` raised by ``Frontend.generate`` before any chunk;
each layer maps its ``code`` (numbered like gRPC status codes) to an HTTP status or a gRPC
status. A failure after the stream started is a final :class:`GenerateChunk` with
``finish_reason = ERROR`` and ``error`` set, never an exception out of the iterator.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from router.disagg import DisaggReason
from workers.engine.types import FinishReason


class ErrorCode(enum.IntEnum):
    """Same numbers as grpc.StatusCode and ferry.v1.ErrorCode."""

    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self, 500)


_HTTP_STATUS = {
    ErrorCode.CANCELLED: 499,
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAVAILABLE: 503,
}


def error_code(value: int) -> ErrorCode:
    """An ErrorCode from a wire number; numbers Ferry does not know become INTERNAL."""
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL


class FrontendError(Exception):
    """A request rejected before its stream started. ``param`` names the offending request
    field when there is one; ``kind`` is a short machine-readable reason
    (``context_length_exceeded``, ``model_not_found``, ...)."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.kind = kind


class InvalidArgument(FrontendError):
    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFound(FrontendError):
    code = ErrorCode.NOT_FOUND


class Unavailable(FrontendError):
    code = ErrorCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerateInput:
    """One generation request, as a layer parsed it. Exactly one of ``prompt``, ``messages``
    and ``prompt_token_ids`` is set. A sampling field left ``None`` takes the engine's default;
    ``max_tokens = None`` means "the rest of the context" (capped by the frontend config's
    ``default_max_tokens``)."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    model: str = ""  # "" : the served model
    request_id: str | None = None  # None: the frontend assigns one
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens found in a prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class StreamError:
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One delta of a generation stream. Exactly one chunk, the last, has a ``finish_reason``;
    it carries ``usage``, and ``error`` when the reason is ERROR."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: StreamError | None = None


@dataclass(frozen=True)
class Completion:
    """A whole generation, gathered from its stream (for non-streaming APIs)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    error: StreamError | None = None


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a worker picker sees: the prompt and the workers it may choose from (ready
    workers, minus those that already refused this request). ``request_id`` is the route id:
    the worker-side request id, unique across frontend replicas (not the caller's id); a retry
    on another worker is picked again with the same id."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    candidates: tuple[str, ...]


class WorkerPicker(Protocol):
    def __call__(self, request: RouteRequest) -> str: ...


@dataclass(frozen=True, slots=True)
class DisaggPlan:
    """Where one request of a disaggregated deployment goes: ``decode_worker`` streams its
    tokens; ``prefill_worker`` (None: the decode worker prefills locally) first computes its
    prompt and first token. ``reason`` says why (a ``/metrics`` label)."""

    decode_worker: str
    prefill_worker: str | None
    reason: DisaggReason


class DisaggPlanner(Protocol):
    """What the frontend asks of a router when prefill and decode workers are registered
    (``orchestrator.frontend.disagg``). Called on the frontend's event loop; must not block.

    ``plan_disagg`` places a request: ``request.candidates`` are the ready decode workers not
    tried yet (the decode worker must be one of them), ``prefill_candidates`` the ready prefill
    workers (the prefill worker, if any, must be one of them). ``decode_started``: a remote
    request's decode worker produced its first tokens (it took the handle).
    ``prefill_failed``: a remote request's prefill worker failed; its decode worker prefills
    locally now. The RouteListener's ``first_token`` (the first token, from whichever worker)
    and ``finished`` (once per planned request) come as for any request."""

    def plan_disagg(self, request: RouteRequest, prefill_candidates: tuple[str, ...]
                    ) -> DisaggPlan: ...

    def decode_started(self, route_id: str) -> None: ...

    def prefill_failed(self, route_id: str) -> None: ...


class RouteListener(Protocol):
    """Told what the frontend does with workers and routed requests (what a KV-aware router
    needs besides picking). Called on the frontend's event loop; must not block.

    ``worker_added`` (the worker's ``ferry.v1.InfoResponse``) may raise ValueError to refuse
    the worker: ``Frontend.add_worker`` then does not add it and raises that error.
    ``first_token`` and ``finished`` name the request by its route id
    (``RouteRequest.request_id``); ``finished`` comes once per picked request, however it
    ended (done, error, cancelled)."""

    def worker_added(self, worker_id: str, info: Any) -> None: ...

    def worker_removed(self, worker_id: str) -> None: ...

    def first_token(self, route_id: str) -> None: ...

    def finished(self, route_id: str) -> None: ...


class FrontendTokenizer(Protocol):
    """What the frontend needs of a tokenizer (workers.tokenizer.Tokenizer fits)."""

    eos_token_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        ...


__all__ = [
    "ChatMessage",
    "Completion",
    "DisaggPlan",
    "DisaggPlanner",
    "ErrorCode",
    "FinishReason",
    "FrontendError",
    "FrontendTokenizer",
    "GenerateChunk",
    "GenerateInput",
    "InvalidArgument",
    "ModelNotFound",
    "RouteListener",
    "RouteRequest",
    "StreamError",
    "Unavailable",
    "Usage",
    "WorkerPicker",
    "error_code",
]
