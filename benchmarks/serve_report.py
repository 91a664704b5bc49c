"""The report of benchmarks/serve_overhead.py: ``Cell`` (one measurement: path, streams,
load and what it gave), the targets, the throughput and added-latency tables, and the verdict
lines (target met or not)."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

from serve_load import LoadResult

TARGET_RPS = 1000.0
TARGET_ADDED_P50_MS = 5.0
TARGET_CONCURRENCY = 64


@dataclass
class Cell:
    path: str
    concurrency: int
    rate: float  # 0: closed loop
    result: LoadResult
    frontend_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0
    others_cores: float = float("nan")  # cores other processes of the machine used meanwhile

    def per_request_ms(self, cpu_s: float) -> float:
        n = self.result.completed_in_window
        return cpu_s * 1000.0 / n if n else float("nan")

    @property
    def p50(self) -> float:
        return percentile(self.result.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.result.latencies_ms, 99)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))]


def _ms(x: float) -> str:
    return f"{x:8.2f}"


def throughput_table(cells: list[Cell]) -> str:
    head = (f"{'path':<10} {'streams':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'msg/req':>8} {_CPU_HEAD} {'errors':>7}")
    lines = [head, "-" * len(head)]
    for c in cells:
        r = c.result
        lines.append(f"{c.path:<10} {c.concurrency:>7} {r.rps:8.0f} {_ms(c.p50)} {_ms(c.p99)} "
                     f"{r.messages_per_request:8.1f} {_cpu(c)} {r.errors:>7}")
    return "\n".join(lines)


def latency_rows(closed: list[Cell], paced: list[Cell]) -> list[tuple[Cell, Cell | None]]:
    """(cell, in-process cell at the same load) for the latency table: one stream from the
    closed loop, more from the paced runs."""
    rows = []
    for c in [x for x in closed if x.concurrency == 1] + paced:
        group = closed if c.concurrency == 1 else paced
        base = next((b for b in group if b.path == "inprocess"
                     and b.concurrency == c.concurrency), None)
        rows.append((c, base))
    return rows


def _cpu(c: Cell) -> str:
    """CPU ms per request: load generator (in-process: everything), frontends, worker."""
    r = c.result
    others = f"{c.others_cores:6.2f}"
    if c.path == "inprocess":  # everything in one process: its CPU time is all there is
        return f"{c.per_request_ms(r.client_cpu_s):21.2f} {'-':>9} {'-':>7} {others}"
    return (f"{c.per_request_ms(r.client_cpu_s):21.2f} {c.per_request_ms(c.frontend_cpu_s):9.2f} "
            f"{c.per_request_ms(c.worker_cpu_s):7.2f} {others}")


_CPU_HEAD = f"{'cpu ms/req: load gen':>21} {'frontends':>9} {'worker':>7} {'others':>6}"


def latency_table(rows: list[tuple[Cell, Cell | None]]) -> str:
    head = (f"{'path':<10} {'streams':>7} {'load':>13} {'req/s':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {_CPU_HEAD} {'errors':>7}")
    lines = [head, "-" * len(head)]
    for c, base in rows:
        load = "closed loop" if not c.rate else f"{c.rate:g} req/s"
        if base is not None and c.path != "inprocess":
            add = f"{_ms(c.p50 - base.p50)} {_ms(c.p99 - base.p99)}"
        else:
            add = f"{'-':>8} {'-':>8}"
        lines.append(f"{c.path:<10} {c.concurrency:>7} {load:>13} {c.result.rps:8.0f} "
                     f"{_ms(c.p50)} {_ms(c.p99)} {add} {_cpu(c)} {c.result.errors:>7}")
    return "\n".join(lines)


def verdict(closed: list[Cell], rows: list[tuple[Cell, Cell | None]],
            more: dict[str, list[float]] | None = None) -> list[str]:
    """The target lines; ``more``: +p50 of the later rounds by path (the verdict takes the
    median of all rounds)."""
    out = []
    for path in ("http", "grpc"):
        tput = next((c for c in closed if c.path == path
                     and c.concurrency == TARGET_CONCURRENCY), None)
        lat = next(((c, b) for c, b in rows if c.path == path
                    and c.concurrency == TARGET_CONCURRENCY and b is not None), None)
        if tput is None or lat is None:
            continue
        rounds = [lat[0].p50 - lat[1].p50, *(more or {}).get(path, [])]
        added = statistics.median(rounds)
        ok = tput.result.rps >= TARGET_RPS and added < TARGET_ADDED_P50_MS \
            and not tput.result.errors and not lat[0].result.errors
        r = tput.result
        cpu_ms = tput.per_request_ms(r.client_cpu_s + tput.frontend_cpu_s + tput.worker_cpu_s)
        each = ", ".join(f"{x:.2f}" for x in rounds)
        median = f"(median of {len(rounds)} rounds: {each}) " if len(rounds) > 1 else ""
        out.append(f"target {path}: {r.rps:.0f} req/s at {TARGET_CONCURRENCY} streams "
                   f"(>= {TARGET_RPS:g}), +p50 {added:.2f} ms at {lat[0].rate:g} req/s {median}"
                   f"(< {TARGET_ADDED_P50_MS:g}): {'met' if ok else 'NOT met'}; other processes "
                   f"kept {tput.others_cores:.2f} of {os.cpu_count()} cores busy meanwhile; "
                   f"{cpu_ms:.2f} ms of CPU per request in all (a CPU-bound estimate for "
                   f"{os.cpu_count()} free cores: {1000.0 * os.cpu_count() / cpu_ms:.0f} req/s)")
    return out
