"""The router's seam types: what goes in (workers, events' outcomes, load, requests) and what
comes out (decisions, overlap scores, stats). Frozen dataclasses, validated when built."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvcache.events import BlockStored
from kvcache.hashing import BlockHashConfig
from kvcache.wire import LoadReport  # noqa: F401  (re-exported: the workers' reports)


def _check_count(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.{name} must be an integer >= 0, got {value!r}")


def _check_id(owner: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{owner}.{name} must be a non-empty string, got {value!r}")


# ---------------------------------------------------------------- index


class ApplyStatus(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # seq already applied: nothing changed
    GAP = "gap"  # seq skips ahead: nothing applied; repair ``missing`` first, then apply again
    UNKNOWN_WORKER = "unknown_worker"  # not added (or removed): nothing changed


@dataclass(frozen=True)
class ApplyResult:
    status: ApplyStatus
    worker_id: str
    seq: int  # the batch's seq
    last_applied_seq: int  # the worker's last applied seq after the call (-1: none)
    missing: range = range(0)  # for GAP: the seqs to replay before this batch

    @property
    def ok(self) -> bool:
        """True when the batch is reflected in the index (applied now or before)."""
        return self.status in (ApplyStatus.APPLIED, ApplyStatus.DUPLICATE)


@dataclass(slots=True)  # not frozen: built once per routed request, and frozen costs 2x
class OverlapScores:
    """Leading blocks held per worker (workers holding none are absent) of ``num_blocks``."""

    scores: dict[str, int]
    num_blocks: int

    def get(self, worker_id: str) -> int:
        return self.scores.get(worker_id, 0)

    def best(self) -> int:
        return max(self.scores.values(), default=0)


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker's blocks at ``seq``, as stored events (their parents keep chains whole)."""

    worker_id: str
    seq: int
    stored: tuple[BlockStored, ...]


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class WorkerLoad:
    """What the cost function reads about one worker: its latest report plus the requests this
    router sent it that the report does not cover yet (see :mod:`router.load`)."""

    worker_id: str
    queued_prefill_blocks: int  # prompt blocks still to prefill
    decode_blocks: int  # blocks held (or about to be) by requests past or in prefill
    kv_blocks_used: int
    kv_blocks_total: int
    waiting: int
    running: int

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


# ---------------------------------------------------------------- router


class RouterMode(str, Enum):
    KV = "kv"  # overlap from the workers' KV events
    APPROX = "approx"  # overlap predicted from the router's own decisions, with a TTL
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True)
class WorkerInfo:
    """A worker joining: what the router must know to route to it."""

    worker_id: str
    hash_config: BlockHashConfig
    capacity_blocks: int  # KV blocks in its pool

    def __post_init__(self) -> None:
        _check_id("WorkerInfo", "worker_id", self.worker_id)
        if not isinstance(self.hash_config, BlockHashConfig):
            raise TypeError(f"WorkerInfo.hash_config must be a BlockHashConfig, got "
                            f"{type(self.hash_config).__name__}")
        if isinstance(self.capacity_blocks, bool) or not isinstance(self.capacity_blocks, int) \
                or self.capacity_blocks < 1:
            raise ValueError(f"WorkerInfo.capacity_blocks must be an integer >= 1, got "
                             f"{self.capacity_blocks!r}")


@dataclass(frozen=True)
class RouteRequest:
    """A request to place. Give its token ids, or its block hashes when already computed
    (``hash_blocks`` of the prompt with the router's config: ``prompt_len // block_size``)."""

    request_id: str
    prompt_len: int
    token_ids: tuple[int, ...] | None = None
    block_hashes: tuple[int, ...] | None = None
    expected_output_tokens: int = 0  # a guess of the decode length; 0 when unknown

    def __post_init__(self) -> None:
        _check_id("RouteRequest", "request_id", self.request_id)
        if isinstance(self.prompt_len, bool) or not isinstance(self.prompt_len, int) \
                or self.prompt_len < 1:
            raise ValueError(f"RouteRequest.prompt_len must be an integer >= 1, got "
                             f"{self.prompt_len!r}")
        _check_count("RouteRequest", "expected_output_tokens", self.expected_output_tokens)
        if (self.token_ids is None) == (self.block_hashes is None):
            raise ValueError("RouteRequest needs exactly one of token_ids or block_hashes")
        if self.token_ids is not None and len(self.token_ids) != self.prompt_len:
            raise ValueError(f"RouteRequest.prompt_len={self.prompt_len} but "
                             f"{len(self.token_ids)} token ids were given")

    @classmethod
    def from_tokens(cls, request_id: str, token_ids: tuple[int, ...] | list[int],
                    expected_output_tokens: int = 0) -> RouteRequest:
        return cls(request_id, len(token_ids), tuple(token_ids), None, expected_output_tokens)


@dataclass(frozen=True)
class WorkerCost:
    """The cost breakdown of one worker for one request (see :mod:`router.cost`)."""

    worker_id: str
    overlap_blocks: int  # leading prompt blocks it holds
    uncached_blocks: int  # prompt blocks it would compute (the partial tail included)
    queued_prefill_blocks: int
    decode_blocks: int
    kv_usage: float
    busy: bool
    cost: float


@dataclass(frozen=True)
class RouteDecision:
    request_id: str
    worker_id: str
    mode: RouterMode
    overlap_blocks: int  # leading prompt blocks the chosen worker holds, as the router knows
    prompt_blocks: int  # full blocks of the prompt (the ones that can be cached)
    cost: WorkerCost  # the chosen worker's breakdown
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class RouterStats:
    """Prefix hits the router achieved against what an infinite shared cache would give."""

    requests: int
    prompt_blocks: int  # full prompt blocks routed
    hit_blocks: int  # of those, held by the chosen worker (as the router knew it)
    achievable_hit_blocks: int  # of those, routed before by any request (a leading run)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def achievable_hit_rate(self) -> float:
        return self.achievable_hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0
