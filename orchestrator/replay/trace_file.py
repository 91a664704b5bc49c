"""Reading a Mooncake trace file (one JSON object a line) for a replay.

Blank lines are skipped; a bad line is an error naming the file and line number. The
requests come back in the file's order; a replay sends them in timestamp order (a stable
sort, so requests with equal timestamps keep the file's order).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from router.trace import TraceRequest, parse_trace_line


def load_trace(path: Path | str, limit: int | None = None) -> list[TraceRequest]:
    """The first ``limit`` requests of the trace at ``path`` (all when None)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {str(path)!r} not found; give a Mooncake JSONL trace "
                         "(one request a line: timestamp, input_length, output_length, "
                         "hash_ids)")
    out: list[TraceRequest] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append(parse_trace_line(line))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise ValueError(f"trace file {str(path)!r} holds no requests")
    return out


def replay_order(requests: Sequence[TraceRequest], limit: int | None = None
                 ) -> list[TraceRequest]:
    """The first ``limit`` of ``requests`` (all when None) in the order a replay sends them:
    by timestamp, equal timestamps in the given order. ValueError when none is left."""
    reqs = list(requests)[:limit] if limit is not None else list(requests)
    if not reqs:
        raise ValueError("nothing to replay: the trace holds no requests")
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i].timestamp_ms, i))
    return [reqs[i] for i in order]


__all__ = ["load_trace", "replay_order"]
