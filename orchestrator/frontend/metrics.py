"""Prometheus metrics of one frontend, in its own CollectorRegistry (two frontends in one
process, as in tests, never share counters). Served as text at ``GET /metrics``.

Per-token cost is one histogram observation per worker chunk (inter-token latency is the gap
between two chunks divided by the tokens the later one brought); everything else is counted
once per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)

# Values of the ``status`` label of ferry_frontend_requests_total.
STATUS_OK = "ok"  # finished with stop or length
STATUS_ABORTED = "aborted"  # the worker ended it (drained / removed)
STATUS_CANCELLED = "cancelled"  # the client went away
STATUS_ERROR = "error"  # failed after it was accepted


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ferry_frontend_requests", "Requests by final status (ok, aborted, cancelled, "
            "error, or the rejection's error code such as invalid_argument)", ["status"],
            registry=r)
        self.in_flight = Gauge("ferry_frontend_requests_in_flight",
                               "Requests streaming now", registry=r)
        self.ttft = Histogram("ferry_frontend_time_to_first_token_seconds",
                              "From request accepted to its first token", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("ferry_frontend_inter_token_latency_seconds",
                             "Gap between tokens after the first", buckets=_ITL_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter("ferry_frontend_prompt_tokens",
                                     "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("ferry_frontend_generation_tokens",
                                         "Tokens generated", registry=r)
        self.cached_tokens = Counter("ferry_frontend_cached_prompt_tokens",
                                     "Prompt tokens found in a worker's prefix cache",
                                     registry=r)
        self.prefix_hit_rate = Gauge("ferry_frontend_prefix_cache_hit_rate",
                                     "Cached / prompt tokens of finished requests since start",
                                     registry=r)
        self.prefix_hit_rate.set_function(self._hit_rate)
        self.kv_blocks_used = Gauge("ferry_frontend_kv_blocks_used",
                                    "KV blocks in use, as the worker last reported",
                                    ["worker"], registry=r)
        self.kv_blocks_total = Gauge("ferry_frontend_kv_blocks_total",
                                     "KV blocks in the worker's pool", ["worker"], registry=r)
        self.ready_workers = Gauge("ferry_frontend_ready_workers", "Workers ready now",
                                   registry=r)
        self._prompt_sum = 0
        self._cached_sum = 0
        self._status_children = {}

    def count(self, status: str) -> None:
        child = self._status_children.get(status)
        if child is None:
            child = self._status_children[status] = self.requests.labels(status=status)
        child.inc()

    def finished(self, status: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int) -> None:
        self.count(status)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        self._prompt_sum += prompt_tokens
        self._cached_sum += cached_tokens

    def worker_load(self, worker_id: str, kv_blocks_used: int, kv_blocks_total: int) -> None:
        self.kv_blocks_used.labels(worker=worker_id).set(kv_blocks_used)
        self.kv_blocks_total.labels(worker=worker_id).set(kv_blocks_total)

    def forget_worker(self, worker_id: str) -> None:
        for gauge in (self.kv_blocks_used, self.kv_blocks_total):
            try:
                gauge.remove(worker_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _hit_rate(self) -> float:
        return self._cached_sum / self._prompt_sum if self._prompt_sum else 0.0


__all__ = ["STATUS_ABORTED", "STATUS_CANCELLED", "STATUS_ERROR", "STATUS_OK", "FrontendMetrics"]
