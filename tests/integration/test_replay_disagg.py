"""Online disaggregated replay of a slice of the synthetic trace: 1 prefill and 2 decode mocker
workers in this process behind gRPC, the frontend's two-hop path routed by a RoutingService,
real KV handles and pulls over gRPC between the workers.

The slice (the first 40 requests of tests/data/synthetic_trace_300.jsonl, 17 of them with at
most 512 prompt tokens, none sharing a prefix with another) replayed 8x faster than recorded,
steps 20x faster than modelled (about 2 s): every request completes, the short ones are
prefilled locally and the long ones on the prefill worker while it is free, every remote
request's decode worker pulls its blocks, and at the end no worker holds a request, a pin or
a block in use; nothing the replay started outlives it.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.online import OnlineReplay
from orchestrator.replay.trace_file import load_trace
from tests.integration.conftest import child_nats_pids
from workers.mocker.timing import TimingModel

pytestmark = pytest.mark.timeout(120)

TRACE = Path(__file__).resolve().parents[1] / "data" / "synthetic_trace_300.jsonl"


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ferry-engine" and t.is_alive()]


@pytest.mark.parametrize("router", ["kv", "round_robin"])
def test_online_disagg_replay_of_a_slice_goes_remote_and_local_and_drains(router):
    trace = load_trace(TRACE, 40)
    short = sum(1 for t in trace if t.input_length <= 512)
    assert short == 17 and all(t.output_length > 1 for t in trace)
    assert engine_threads() == []
    cfg = ReplayConfig(trace=TRACE, prefill_workers=1, decode_workers=2, router=router,
                       speedup=8.0, timing=TimingModel(speedup=20.0), limit=40)
    nats_before = child_nats_pids()
    replay = OnlineReplay(cfg, trace)
    report = asyncio.run(replay.run())
    assert child_nats_pids() == nats_before
    assert engine_threads() == []  # every worker's engine stopped

    assert (report.mode, report.workers) == ("online", 3)
    assert (report.requests, report.completed, report.failed) == (40, 40, 0)
    assert report.output_tokens == sum(t.output_length for t in trace)
    assert report.prompt_tokens == sum(t.input_length for t in trace)
    assert report.oracle_hit_tokens == 0 and report.cached_tokens == 0  # no shared prefix
    assert report.ttft.count == 40
    d = report.disagg
    assert d is not None and (d.prefill_workers, d.decode_workers) == (1, 2)
    assert d.remote + d.local == 40 and report.router_stats.requests == 40
    # the short prompts stay on their decode worker; the first (40,160 tokens at t = 0, the
    # prefill worker idle) goes remote
    assert d.decisions["short_prefill"] == short
    assert d.remote == d.decisions["long_prefill"] >= 1
    assert d.local == short + d.decisions["prefill_busy"] and d.decisions["prefill_failed"] == 0
    assert sum(d.prefill_requests_per_worker.values()) == d.remote
    assert sum(d.decode_requests_per_worker.values()) == 40
    # every remote request pulls its prompt's full blocks over gRPC: nothing held already
    assert (d.pulls, d.pulls_failed, d.no_room, d.skipped_blocks) == (d.remote, 0, 0, 0)
    assert d.pulls_by_transport == {"grpc": d.remote} and d.transfer.count == d.remote
    # the first prompt's 627 full blocks of 64, and at least 8 of every other (546 tokens)
    assert d.pulled_blocks >= 627 + 8 * (d.remote - 1)
    assert d.ttft_at_decode.count == 40 and d.ttft_at_decode.mean_ms > report.ttft.mean_ms
    assert replay.left == {w: [] for w in ("prefill-0", "decode-0", "decode-1")}
