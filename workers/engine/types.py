"""Typed values that cross the engine's seams: requests in, outputs out, and the batch the
scheduler hands to a runner (torch model runner or mocker runner).

Runner protocol: the scheduler builds a :class:`ScheduledBatch`; the runner computes the KV of
every listed token (writing it into the slots named by each sequence's block table), samples
one next token for every sequence whose ``sample`` flag is set, and returns them in a
:class:`RunnerOutput` together with the time the pass took (measured for the torch runner,
modelled for the mocker).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol

from kvcache.holds import PinnedBlocks


class InvalidRequestError(ValueError):
    """A request the caller must change before it can run (maps to HTTP 400 / INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized text
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequestError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float | None = None  # on the engine's clock; None: now
    # Disaggregation, prefill side: when the request finishes (not aborted, no error), pin its
    # full prompt blocks (kvcache.holds) and report them on the last output (``pinned``).
    pin_prompt: bool = False


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (a delta, not the whole text)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str  # "" when the engine has no tokenizer
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int  # total so far
    first_token_time: float | None = None  # engine clock
    arrival_time: float | None = None
    error: str | None = None  # why, when finish_reason is ERROR
    pinned: PinnedBlocks | None = None  # last output of a pin_prompt request (see EngineRequest)


@dataclass(frozen=True)
class ScheduledSeq:
    request_id: str
    token_ids: tuple[int, ...]  # the tokens whose KV is computed in this pass
    start_pos: int  # position of token_ids[0] (= tokens already computed)
    block_table: tuple[int, ...]  # physical blocks of the whole sequence so far
    sample: bool  # True when this pass reaches the last known token: sample the next one
    sampling: SamplingParams
    num_output_tokens: int  # tokens generated so far (seeded sampling uses it)
    is_prefill: bool  # False for a plain decode step (one token, after the first output)


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: tuple[ScheduledSeq, ...]
    block_size: int
    kv_usage: float  # share of KV blocks in use after scheduling (0..1)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs if s.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs if not s.is_prefill)


@dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, int]  # request_id -> next token, for every seq with sample=True
    duration_s: float


class Runner(Protocol):
    """Executes scheduled batches. Implemented by the torch model runner and the mocker."""

    vocab_size: int
    max_model_len: int

    def execute(self, batch: ScheduledBatch) -> RunnerOutput: ...

    def now(self) -> float:
        """The runner's clock in seconds (wall clock, or a virtual clock for the mocker)."""
        ...
