"""The offline replay at tiny sizes: latencies are exactly the timing model's, the router's
choice shows in the cached tokens, and the report adds up."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.report import LatencySummary
from orchestrator.replay.simulator import OfflineReplay, replay_offline
from router.trace import TraceRequest
from workers.mocker.timing import TimingModel

T = TimingModel()


def config(**kwargs) -> ReplayConfig:
    base = {"trace": Path("unused"), "workers": 2, "block_size": 16, "num_blocks": 64}
    return ReplayConfig(**(base | kwargs))


def test_one_request_takes_the_modelled_times():
    # 100 prompt tokens in one pass, then 2 decode steps; 7 blocks of 16 in use of 64 while
    # decoding (101 and 102 tokens).
    report = replay_offline(config(), [TraceRequest(0.0, 100, 3, (7,))])
    prefill = T.prefill_ms(100)
    decode = T.decode_ms(7 / 64)
    assert (report.completed, report.failed, report.output_tokens) == (1, 0, 3)
    assert report.ttft.count == 1 and report.ttft.mean_ms == pytest.approx(prefill)
    assert report.itl.count == 2 and report.itl.mean_ms == pytest.approx(decode)
    assert report.e2e.mean_ms == pytest.approx(prefill + 2 * decode)
    assert report.duration_s == pytest.approx((prefill + 2 * decode) / 1000)
    assert report.output_tokens_per_s == pytest.approx(3 / report.duration_s)


def test_speedup_divides_arrival_times_and_a_busy_worker_queues():
    # Two requests 10 ms apart on one worker: at speedup 1 the second arrives during the
    # first's prefill pass and waits for it; at speedup 0.01 (100x slower arrivals) it does not.
    trace = [TraceRequest(0.0, 600, 1, (1, 2)), TraceRequest(10.0, 600, 1, (3, 4))]
    fast = replay_offline(config(workers=1), trace)
    first = T.prefill_ms(600)
    assert fast.ttft.max_ms == pytest.approx(2 * first - 10.0)  # waited for pass 1, then its own
    slow = replay_offline(config(workers=1, speedup=0.01), trace)
    assert slow.ttft.max_ms == pytest.approx(first)


@pytest.mark.parametrize("router, spread, cached", [
    ("kv", [0, 2], 512),  # follows the prefix: id 1 is 512 tokens = 32 blocks of 16
    ("approx", [0, 2], 512),  # predicted from its own first decision
    ("round_robin", [1, 1], 0),  # the next worker in turn, whatever it holds
])
def test_the_router_decides_what_is_cached(router, spread, cached):
    trace = [TraceRequest(0.0, 600, 2, (1, 2)), TraceRequest(5000.0, 700, 2, (1, 3))]
    replay = OfflineReplay(config(router=router, num_blocks=256), trace)
    report = replay.run()
    assert sorted(report.router_stats.requests_per_worker.values()) == spread
    assert report.cached_tokens == cached and report.oracle_hit_tokens == 512
    assert report.prompt_tokens == 1300
    assert report.router_stats.achievable_hit_blocks == 32
    assert report.router_stats.hit_blocks == cached // 16


def test_limit_and_arrival_order():
    trace = [TraceRequest(50.0, 20, 1, (2,)), TraceRequest(0.0, 20, 1, (1,)),
             TraceRequest(10.0, 20, 1, (3,))]
    report = replay_offline(config(limit=2), trace)
    assert (report.requests, report.completed) == (2, 2)  # the first two lines, sorted by time
    with pytest.raises(RuntimeError, match="runs once"):
        r = OfflineReplay(config(), trace)
        r.run()
        r.run()
    with pytest.raises(ValueError, match="nothing to replay"):
        OfflineReplay(config(), [])


def test_latency_summary_exact():
    s = LatencySummary.of_seconds([0.004, 0.001, 0.002, 0.003])
    assert (s.count, s.mean_ms, s.p50_ms, s.max_ms) == (4, 2.5, 2.5, 4.0)
    assert s.p99_ms == pytest.approx(3.97)
    assert LatencySummary.of_seconds([]) == LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
