"""Trace replay of a slice of the synthetic trace (tests/data/synthetic_trace_300.jsonl: its
first 300 lines), offline and online.

- offline (virtual clock, real router, schedulers and block pools): every request completes
  and KV routing reuses far more of the prompts than round robin, close to the oracle;
- online (a live local cluster: nats-server, mocker workers behind gRPC, a routed frontend):
  every request completes, prefixes are reused, and nothing it started outlives it.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.online import OnlineReplay, run_online
from orchestrator.replay.simulator import replay_offline
from orchestrator.replay.trace_file import load_trace
from tests.integration.conftest import child_nats_pids
from workers.mocker.timing import TimingModel

pytestmark = pytest.mark.timeout(120)

TRACE = Path(__file__).resolve().parents[1] / "data" / "synthetic_trace_300.jsonl"


@pytest.fixture(scope="module")
def trace():
    return load_trace(TRACE)


def test_offline_kv_beats_round_robin_on_the_slice(trace):
    # The slice's requests of at most 10,000 prompt tokens (155 of 300, 0 to 87 s): cheap to
    # simulate, and four groups of them share prefixes.
    small = [r for r in trace if r.input_length <= 10_000]
    assert len(small) == 155
    reports = {router: replay_offline(ReplayConfig(trace=TRACE, router=router), small)
               for router in ("kv", "round_robin")}
    kv, rr = reports["kv"], reports["round_robin"]
    for r in (kv, rr):
        assert (r.requests, r.completed, r.failed, r.preemptions) == (155, 155, 0, 0)
        assert r.output_tokens == sum(max(1, t.output_length) for t in small)
        assert r.oracle_hit_tokens == 22464 and r.prompt_tokens == sum(t.input_length
                                                                      for t in small)
    assert kv.cached_tokens >= 0.95 * kv.oracle_hit_tokens
    assert kv.prefix_reuse > 3 * rr.prefix_reuse
    assert kv.ttft.mean_ms < rr.ttft.mean_ms


def test_online_replay_of_a_slice_completes_and_reuses_prefixes(trace):
    # Requests 15, 58, 74 and 90 share their first 2,560 tokens (74 repeats 15 whole: 2,688
    # cached, the block holding the last token is computed), 180 repeats 124 (5,888 cached);
    # arrivals 20x faster than recorded (about 2.5 s), steps 10x faster than modelled.
    picked = [trace[i] for i in (15, 58, 74, 90, 124, 180)]
    before = child_nats_pids()
    cfg = ReplayConfig(trace=TRACE, workers=3, speedup=20.0, timing=TimingModel(speedup=10.0))
    report = run_online(cfg, picked)
    assert child_nats_pids() == before  # its nats-server is stopped
    assert report.mode == "online"
    assert (report.requests, report.completed, report.failed) == (6, 6, 0)
    assert report.output_tokens == sum(t.output_length for t in picked)
    assert report.prompt_tokens == sum(t.input_length for t in picked)
    assert report.ttft.count == 6 and report.ttft.mean_ms > 0
    assert report.oracle_hit_tokens == 2560 + 2688 + 2560 + 5888
    assert report.cached_tokens > 0 and report.prefix_reuse > 0
    assert report.router_stats.requests == 6
    assert sum(report.router_stats.requests_per_worker.values()) == 6


def test_a_cancelled_online_replay_stops_everything_it_started(trace):
    # Ctrl-C makes asyncio.run cancel the replay's task: the workers' engine threads, their
    # gRPC servers and the nats-server must all be gone afterwards.
    picked = [trace[i] for i in (15, 58, 74, 90)]
    cfg = ReplayConfig(trace=TRACE, workers=2, speedup=1.0, timing=TimingModel(speedup=10.0))
    nats_before, threads_before = child_nats_pids(), set(threading.enumerate())

    async def main():
        task = asyncio.create_task(OnlineReplay(cfg, picked).run())
        await asyncio.sleep(1.5)  # started, first request sent, the others not yet due
        assert len(set(threading.enumerate()) - threads_before) >= 2  # the engine threads
        assert len(child_nats_pids() - nats_before) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert child_nats_pids() == nats_before
    left = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert left == []
