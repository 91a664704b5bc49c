"""Ferry's KV-aware router: prefix index, load view, cost function and routing policies.

Pure: no I/O, no threads; fed KV events and load reports, it answers ``route(request)``.
Imports nothing of Ferry's except ``kvcache`` and ``proto``.
"""

from router.approx import ApproxCaches
from router.cost import CostChoice, CostConfig, choose_worker, is_busy, softmax_weights, worker_cost
from router.index import PrefixIndex
from router.load import LoadView
from router.router import (
    ApproxRouter,
    KvRouter,
    RandomRouter,
    RoundRobinRouter,
    Router,
    make_router,
)
from router.trace import TraceRequest, hash_id_tokens, parse_trace_line, request_token_ids
from router.types import (
    ApplyResult,
    ApplyStatus,
    LoadReport,
    OverlapScores,
    RouteDecision,
    RouteRequest,
    RouterMode,
    RouterStats,
    WorkerCost,
    WorkerInfo,
    WorkerLoad,
    WorkerSnapshot,
)

__all__ = [
    "ApplyResult",
    "ApplyStatus",
    "ApproxCaches",
    "ApproxRouter",
    "CostChoice",
    "CostConfig",
    "KvRouter",
    "LoadReport",
    "LoadView",
    "OverlapScores",
    "PrefixIndex",
    "RandomRouter",
    "RoundRobinRouter",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "RouterMode",
    "RouterStats",
    "TraceRequest",
    "WorkerCost",
    "WorkerInfo",
    "WorkerLoad",
    "WorkerSnapshot",
    "choose_worker",
    "hash_id_tokens",
    "is_busy",
    "make_router",
    "parse_trace_line",
    "request_token_ids",
    "softmax_weights",
    "worker_cost",
]
