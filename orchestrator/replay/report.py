"""The result of a trace replay: :class:`ReplayReport`, as a table or as one JSON object.

Definitions (times in ms of the replay's clock: virtual for offline, wall for online):

- ``ttft``: first token time minus arrival time, per completed request.
- ``itl`` (inter-token latency): the gaps between consecutive output tokens of a request
  after its first, pooled over all requests (a request of n tokens gives n - 1 gaps; tokens
  that arrive together give gaps of 0).
- percentiles: linear interpolation between the closest ranks (numpy's default).
- ``output_tokens_per_s``: output tokens of completed requests over ``duration_s``, the span
  from the first arrival to the last finish.
- ``prefix_reuse``: prompt tokens served from the workers' prefix caches (the engines'
  ``num_cached_tokens``, counted at each request's first schedule) over all prompt tokens of
  the completed requests. Disaggregated: the cache of the worker that computed the prompt:
  the prefill worker's for a remote prefill (what the live frontend reports as the request's
  cached tokens; the blocks the decode worker then pulls or already held are not counted
  again), the decode worker's for a local one.
- ``oracle_reuse``: the same share for an infinite cache shared by all workers (see
  :mod:`orchestrator.replay.oracle`): the ceiling any router could reach.
- ``router``: the router's own view (:class:`~router.types.RouterStats`): full prompt blocks
  routed, those the chosen worker held as the router knew it, and those any earlier request
  had; plus how many requests each worker got. Disaggregated: the hits are those of the
  worker that prefills (see :class:`~router.disagg.DisaggStats`).
- ``disagg`` (disaggregated replays only, :class:`DisaggSummary`): the router's decisions by
  reason (:class:`~router.disagg.DisaggReason`: remote ``long_prefill``; local
  ``short_prefill``, ``prefill_busy``; ``prefill_failed`` counts remote requests that fell
  back to a local prefill), and the KV pulls: how many, the blocks pulled and the bytes (the
  transfer model's), the handle blocks the decode worker already held (not pulled), pulls
  refused for want of free blocks (the decode worker prefilled instead), and the pull
  durations; ``ttft_at_decode``: TTFT as if the first token counted only when a decode worker
  produces a token (after the pull; NVIDIA Dynamo's mocker replay counts it so). Online, the
  pulls are the decode workers' real imports over gRPC (blocks pulled, held already, no room,
  failed, by transport) and their durations are measured, from the decode worker taking the
  handle to the blocks in its cache; no KV bytes move (the mocker's cache has none), so the
  bytes are 0 and the transfer model's fields None.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from orchestrator.replay.config import ReplayConfig
    from router.types import RouterStats


@dataclass(frozen=True)
class LatencySummary:
    """Count, mean and percentiles of one latency, in milliseconds (0 when count is 0)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of_seconds(cls, values_s: Sequence[float] | np.ndarray) -> LatencySummary:
        a = np.asarray(values_s, dtype=np.float64) * 1000.0
        if a.size == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(int(a.size), float(a.mean()), float(p50), float(p90), float(p99),
                   float(a.max()))


@dataclass(frozen=True)
class RouterSummary:
    requests: int
    prompt_blocks: int
    hit_blocks: int
    achievable_hit_blocks: int
    hit_rate: float
    achievable_hit_rate: float
    requests_per_worker: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, stats: RouterStats, requests_per_worker: dict[str, int]) -> RouterSummary:
        return cls(stats.requests, stats.prompt_blocks, stats.hit_blocks,
                   stats.achievable_hit_blocks, stats.hit_rate, stats.achievable_hit_rate,
                   dict(requests_per_worker))


@dataclass(frozen=True)
class DisaggSummary:
    prefill_workers: int
    decode_workers: int
    decisions: dict[str, int]  # DisaggReason value -> requests
    remote: int  # routed to a prefill worker
    local: int  # prefilled on their decode worker from the start
    pulls: int  # imports that pulled at least one block
    pulled_blocks: int
    skipped_blocks: int  # handle blocks the decode worker already cached
    no_room: int  # imports refused for want of free blocks (prefilled on the decode worker)
    transfer_bytes: int  # online: 0 (the mocker's KV cache has no bytes)
    transfer: LatencySummary  # pull durations (online: each import's, measured)
    ttft_at_decode: LatencySummary  # completed requests: arrival to a token from the decode
    # worker (remote: its first, after the pull; one-token requests and local: the first)
    kv_bytes_per_token: int | None  # the transfer model's; None online (pulls are real)
    bandwidth_gb_s: float | None
    prefill_requests_per_worker: dict[str, int] = field(default_factory=dict)
    decode_requests_per_worker: dict[str, int] = field(default_factory=dict)
    pulls_failed: int = 0  # online: pulls that failed (the decode worker prefilled instead)
    pulls_by_transport: dict[str, int] = field(default_factory=dict)  # online: successful
    # pulls by the transport that moved them (the decode workers' Stats)

    def rows(self) -> list[tuple[str, str]]:
        d = self.decisions
        local = [r for r in ("short_prefill", "prefill_busy", "no_prefill_worker")
                 if d.get(r)]
        t = self.transfer
        return [
            ("remote prefill", f"{self.remote} ({_reasons(d, ['long_prefill'])})"
                               + (f", {d['prefill_failed']} fell back to local"
                                  if d.get("prefill_failed") else "")),
            ("local prefill", f"{self.local}" + (f" ({_reasons(d, local)})" if local else "")),
            ("KV pulls", f"{self.pulls}: {self._moved()}; {self.skipped_blocks} blocks held "
                         "already" + (f"; {self.no_room} without room" if self.no_room else "")
                         + (f"; {self.pulls_failed} failed" if self.pulls_failed else "")),
            ("pull time mean / p99" if self.bandwidth_gb_s is not None
             else "KV import mean / p99", f"{t.mean_ms:.2f} / {t.p99_ms:.2f} ms"),
            ("TTFT at decode mean / p99", (f"{self.ttft_at_decode.mean_ms:.1f} / "
                                           f"{self.ttft_at_decode.p99_ms:.1f} ms")),
            ("requests per prefill worker", _spread(self.prefill_requests_per_worker)),
            ("requests per decode worker", _spread(self.decode_requests_per_worker)),
        ]

    def _moved(self) -> str:
        if self.bandwidth_gb_s is not None:  # the offline transfer model
            return (f"{self.pulled_blocks} blocks, {self.transfer_bytes / 1e9:.2f} GB at "
                    f"{_num(self.bandwidth_gb_s)} GB/s")
        over = ", ".join(f"{n} over {name}" for name, n in sorted(self.pulls_by_transport.items()))
        return f"{self.pulled_blocks} blocks ({over or 'none moved'}; mocker: no KV bytes)"


@dataclass(frozen=True)
class ReplayReport:
    mode: str  # "offline" or "online"
    router: str
    workers: int
    speedup: float
    requests: int  # sent
    completed: int  # finished with all their output tokens
    failed: int  # refused or ended with an error
    duration_s: float
    ttft: LatencySummary
    itl: LatencySummary
    e2e: LatencySummary
    prompt_tokens: int  # of the completed requests
    cached_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    prefix_reuse: float
    oracle_hit_tokens: int
    oracle_reuse: float
    preemptions: int
    router_stats: RouterSummary
    wall_s: float  # real seconds the replay took
    disagg: DisaggSummary | None = None  # disaggregated replays only

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def format_table(self) -> str:
        """A human-readable table of the headline figures."""
        t, i, r = self.ttft, self.itl, self.router_stats
        dis = self.disagg
        workers = f"{self.workers} workers" if dis is None else (
            f"{dis.prefill_workers} prefill + {dis.decode_workers} decode workers")
        rows = [
            ("replay", (f"{self.mode}, router {self.router}, {workers}, "
                        f"speedup {_num(self.speedup)}")),
            ("requests", f"{self.completed} completed of {self.requests}"
                         + (f" ({self.failed} failed)" if self.failed else "")),
            ("duration", f"{self.duration_s:.1f} s (replayed in {self.wall_s:.1f} s)"),
            ("TTFT mean / p50 / p99", f"{t.mean_ms:.1f} / {t.p50_ms:.1f} / {t.p99_ms:.1f} ms"),
            ("ITL mean / p99", f"{i.mean_ms:.2f} / {i.p99_ms:.2f} ms"),
            ("E2E mean / p99", f"{self.e2e.mean_ms:.1f} / {self.e2e.p99_ms:.1f} ms"),
            ("output tokens/s", f"{self.output_tokens_per_s:.1f}"),
            ("prefix reuse", f"{_pct(self.prefix_reuse)} of {self.prompt_tokens} prompt tokens"),
            ("oracle reuse", f"{_pct(self.oracle_reuse)} (infinite shared cache)"),
            ("router hit / achievable", (f"{_pct(r.hit_rate)} / {_pct(r.achievable_hit_rate)} "
                                         f"of {r.prompt_blocks} blocks")),
        ]
        if dis is None:
            rows.append(("requests per worker", _spread(r.requests_per_worker)))
        else:
            rows += dis.rows()
        rows.append(("preemptions", str(self.preemptions)))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@dataclass
class Tally:
    """What a replay adds up for its report while it runs (every replay: offline, disaggregated,
    online); :meth:`report` turns it into a :class:`ReplayReport`."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    oracle_tokens: int = 0
    output_tokens: int = 0
    first_arrival: float | None = None
    last_finish: float = 0.0

    def arrived(self, t: float) -> None:
        if self.first_arrival is None:
            self.first_arrival = t

    def complete(self, end: float, arrival: float, prompt_tokens: int, cached_tokens: int,
                 oracle_tokens: int, output_tokens: int) -> None:
        """A request that ended at ``end`` with all its output tokens (TTFT and ITL are the
        caller's: a replay adds them as the tokens come)."""
        self.completed += 1
        self.e2e.append(end - arrival)
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.oracle_tokens += oracle_tokens
        self.output_tokens += output_tokens
        self.last_finish = max(self.last_finish, end)

    @property
    def duration_s(self) -> float:
        """From the first arrival to the last finish (0 before a request completed)."""
        if self.first_arrival is None:
            return 0.0
        return max(0.0, self.last_finish - self.first_arrival)

    def report(self, config: ReplayConfig, *, mode: str, requests: int, failed: int,
               preemptions: int, router: RouterSummary, wall_s: float,
               disagg: DisaggSummary | None = None) -> ReplayReport:
        duration = self.duration_s
        return ReplayReport(
            mode=mode, router=config.router.value, workers=config.num_workers,
            speedup=config.speedup, requests=requests, completed=self.completed, failed=failed,
            duration_s=duration,
            ttft=LatencySummary.of_seconds(self.ttft),
            itl=LatencySummary.of_seconds(np.asarray(self.itl)),
            e2e=LatencySummary.of_seconds(self.e2e),
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
            output_tokens=self.output_tokens,
            output_tokens_per_s=self.output_tokens / duration if duration > 0 else 0.0,
            prefix_reuse=share(self.cached_tokens, self.prompt_tokens),
            oracle_hit_tokens=self.oracle_tokens,
            oracle_reuse=share(self.oracle_tokens, self.prompt_tokens),
            preemptions=preemptions, router_stats=router, wall_s=wall_s, disagg=disagg)


def share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _spread(per: dict[str, int]) -> str:
    return f"{min(per.values())}..{max(per.values())}" if per else "-"


def _reasons(decisions: dict[str, int], names: list[str]) -> str:
    return ", ".join(f"{n} {decisions.get(n, 0)}" for n in names)


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def _num(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"


__all__ = ["DisaggSummary", "LatencySummary", "ReplayReport", "RouterSummary", "Tally", "share"]
