"""The offline disaggregated replay at tiny sizes: a remote prefill takes exactly the timing and
transfer models' times, the next turn lands on the decode worker that pulled the first, the
decode worker pulls only what it lacks, and every worker ends with nothing pinned or in use."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.disagg import DisaggReplay
from orchestrator.replay.simulator import OfflineReplay, replay_offline
from orchestrator.replay.trace_file import load_trace
from orchestrator.replay.transfer import KvTransferModel
from router.disagg import DisaggConfig
from router.trace import TraceRequest
from workers.mocker.timing import TimingModel

T = TimingModel()
# 1 ms per token pulled plus 4 ms per pull: 6 blocks of 16 tokens take 100 ms
SLOW_LINK = KvTransferModel(bytes_per_token=1_000_000, bandwidth_gb_s=1.0, latency_ms=4.0)


def config(**kwargs) -> ReplayConfig:
    base = {"trace": Path("unused"), "prefill_workers": 1, "decode_workers": 1,
            "block_size": 16, "num_blocks": 64, "transfer": SLOW_LINK,
            "disagg": DisaggConfig(max_local_prefill_tokens=32)}
    return ReplayConfig(**(base | kwargs))


def drained(replay: DisaggReplay) -> None:
    for w in replay.workers.values():
        w.check_drained()
        assert len(w.engine.kv.holds) == 0 and w.engine.kv.num_used_blocks == 0


def test_a_remote_prefill_takes_the_modelled_times():
    # P prefills 100 tokens and samples the first token (TTFT); D pulls the 6 full blocks
    # (100 ms), computes the last 4 prompt tokens and the first token (5) and samples token 2,
    # then one decode step (7 blocks of 64 in use) gives token 3.
    replay = DisaggReplay(config(), [TraceRequest(0.0, 100, 3, (7,))])
    report = replay.run()
    prefill, tail, decode = T.prefill_ms(100), T.prefill_ms(5), T.decode_ms(7 / 64)
    assert (report.completed, report.failed, report.output_tokens) == (1, 0, 3)
    assert report.ttft.mean_ms == pytest.approx(prefill)
    assert report.itl.count == 2
    assert report.itl.max_ms == pytest.approx(100.0 + tail)
    assert report.itl.mean_ms == pytest.approx((100.0 + tail + decode) / 2)
    assert report.e2e.mean_ms == pytest.approx(prefill + 100.0 + tail + decode)
    d = report.disagg
    assert d is not None and (d.remote, d.local, d.pulls, d.pulled_blocks, d.skipped_blocks,
                              d.no_room) == (1, 0, 1, 6, 0, 0)
    assert d.transfer_bytes == 96 * 1_000_000 and d.transfer.mean_ms == pytest.approx(100.0)
    assert d.ttft_at_decode.mean_ms == pytest.approx(prefill + 100.0 + tail)  # D's first token
    assert d.decisions["long_prefill"] == 1
    assert (d.prefill_requests_per_worker, d.decode_requests_per_worker) == (
        {"prefill-0": 1}, {"decode-0": 1})
    assert report.workers == 2 and report.cached_tokens == 0
    drained(replay)
    # the pulled blocks are cached on D (and P keeps its own, unpinned)
    for w in replay.workers.values():
        assert w.engine.kv.pool.num_cached >= 6


def test_a_short_prompt_is_prefilled_on_the_decode_worker():
    replay = DisaggReplay(config(), [TraceRequest(0.0, 30, 2, (7,))])
    report = replay.run()
    assert report.ttft.mean_ms == pytest.approx(T.prefill_ms(30))
    d = report.disagg
    assert (d.remote, d.local, d.pulls, d.decisions["short_prefill"]) == (0, 1, 0, 1)
    assert d.prefill_requests_per_worker == {"prefill-0": 0}
    drained(replay)


def test_one_output_token_ends_on_the_prefill_worker():
    # the first token is the whole answer: no pull, the pin is released, nothing on D
    replay = DisaggReplay(config(), [TraceRequest(0.0, 100, 1, (7,))])
    report = replay.run()
    assert report.ttft.mean_ms == pytest.approx(T.prefill_ms(100))
    assert report.e2e.mean_ms == pytest.approx(T.prefill_ms(100))
    assert (report.completed, report.output_tokens, report.disagg.pulls) == (1, 1, 0)
    assert report.disagg.ttft_at_decode.mean_ms == pytest.approx(T.prefill_ms(100))
    assert replay.workers["decode-0"].engine.kv.pool.num_cached == 0
    drained(replay)


# Turn 2 repeats turn 1's 600-token prompt and adds 100 tokens: 37 full blocks of 16 shared.
TURNS = [TraceRequest(0.0, 600, 2, (1, 2)), TraceRequest(5000.0, 700, 2, (1, 2))]


def test_the_next_turn_lands_on_the_decode_worker_holding_the_first():
    # turn 1: 600 uncached tokens, remote. Turn 2: the decode worker that pulled turn 1's
    # 37 blocks lacks only 108 tokens: local (short_prefill) on that same worker.
    replay = DisaggReplay(config(prefill_workers=2, decode_workers=2, num_blocks=256,
                                 disagg=DisaggConfig(max_local_prefill_tokens=128)), TURNS)
    report = replay.run()
    d = report.disagg
    assert (d.remote, d.local, d.pulls, d.pulled_blocks) == (1, 1, 1, 37)
    assert (d.decisions["long_prefill"], d.decisions["short_prefill"]) == (1, 1)
    assert sorted(d.decode_requests_per_worker.values()) == [0, 2]  # both turns on one
    assert sorted(d.prefill_requests_per_worker.values()) == [0, 1]
    assert report.cached_tokens == 592 and report.oracle_hit_tokens == 592
    assert report.router_stats.hit_blocks == 37  # the decode worker's, known from its events
    drained(replay)


def test_round_robin_ignores_caches():
    # round robin: the other decode worker and the other prefill worker, which hold nothing;
    # it reads no KV events (as live), so turn 2's whole prompt counts: remote
    replay = DisaggReplay(config(prefill_workers=2, decode_workers=2, num_blocks=256,
                                 router="round_robin",
                                 disagg=DisaggConfig(max_local_prefill_tokens=128)), TURNS)
    report = replay.run()
    d = report.disagg
    assert (d.remote, d.local, d.pulls, d.pulled_blocks, d.skipped_blocks) == (2, 0, 2, 80, 0)
    assert d.decode_requests_per_worker == {"decode-0": 1, "decode-1": 1}
    assert d.prefill_requests_per_worker == {"prefill-0": 1, "prefill-1": 1}
    assert report.cached_tokens == 0 and report.router_stats.hit_blocks == 0
    drained(replay)


def test_the_decode_worker_pulls_only_what_it_lacks():
    # every uncached prompt goes remote: turn 2 runs on the prefill worker that holds turn 1
    # (592 tokens cached there) and the decode worker holding turn 1, which skips the 37
    # blocks it has and pulls the other 6 of turn 2's 43
    replay = DisaggReplay(config(prefill_workers=2, decode_workers=2, num_blocks=256,
                                 disagg=DisaggConfig(max_local_prefill_tokens=0)), TURNS)
    report = replay.run()
    d = report.disagg
    assert (d.remote, d.pulls, d.pulled_blocks, d.skipped_blocks) == (2, 2, 43, 37)
    assert sorted(d.decode_requests_per_worker.values()) == [0, 2]
    assert sorted(d.prefill_requests_per_worker.values()) == [0, 2]
    assert report.cached_tokens == 592
    assert d.transfer.max_ms == pytest.approx(4.0 + 37 * 16)  # turn 1's pull
    assert d.transfer.mean_ms == pytest.approx(4.0 + (37 + 6) * 16 / 2)
    drained(replay)


def test_a_busy_prefill_pool_sends_the_prompt_to_the_decode_worker():
    # at one instant: the first long prompt queues 38 blocks (608 tokens) on the only
    # prefill worker, above the 100-token limit: the second is prefilled locally
    trace = [TraceRequest(0.0, 600, 2, (1, 2)), TraceRequest(0.0, 600, 2, (3, 4))]
    replay = DisaggReplay(config(num_blocks=256, disagg=DisaggConfig(
        max_local_prefill_tokens=32, max_prefill_queue_tokens=100)), trace)
    d = replay.run().disagg
    assert (d.decisions["long_prefill"], d.decisions["prefill_busy"]) == (1, 1)
    drained(replay)


@pytest.mark.parametrize("router", ["kv", "approx", "round_robin", "random"])
def test_every_router_drains_a_trace_slice(router):
    trace = [TraceRequest(i * 40.0, 100 + 37 * i, 1 + i % 4, (i % 3, 10 + i)) for i in range(12)]
    replay = DisaggReplay(config(prefill_workers=2, decode_workers=2, num_blocks=128,
                                 router=router), trace)
    report = replay.run()
    assert (report.completed, report.failed) == (12, 0)
    assert report.output_tokens == sum(1 + i % 4 for i in range(12))
    d = report.disagg
    assert d.remote + d.local == 12 and report.ttft.count == 12
    drained(replay)


def test_a_leftover_pin_fails_the_drain_check():
    replay = DisaggReplay(config(), [TraceRequest(0.0, 100, 3, (7,))])
    replay.run()
    p = replay.workers["prefill-0"]
    p.engine.kv.holds.reserve("left", 1)
    with pytest.raises(RuntimeError, match=r"prefill-0 is not drained .* 1 hold\(s\) of 1 "
                                           r"block\(s\) left"):
        p.check_drained()


def test_dispatch_and_refusals():
    trace = [TraceRequest(0.0, 30, 1, (7,))]
    assert replay_offline(config(), trace).disagg is not None  # replay_offline picks it
    with pytest.raises(ValueError, match="replay it with orchestrator.replay.disagg"):
        OfflineReplay(config(), trace)
    with pytest.raises(ValueError, match="DisaggReplay needs prefill_workers"):
        DisaggReplay(ReplayConfig(trace=Path("u")), trace)
    with pytest.raises(RuntimeError, match="runs once"):
        r = DisaggReplay(config(), trace)
        r.run()
        r.run()


@pytest.mark.parametrize("kwargs, message", [
    ({"bytes_per_token": 0}, "kv bytes per token must be an integer >= 1"),
    ({"bandwidth_gb_s": 0}, "kv transfer bandwidth must be a number of GB/s > 0"),
    ({"latency_ms": -1}, "kv transfer latency must be a number of ms >= 0"),
])
def test_transfer_model_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KvTransferModel(**kwargs)


def test_transfer_model_default_is_llama3_8b_at_64_gb_s():
    m = KvTransferModel()
    assert m.bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert m.seconds(512) == pytest.approx(512 * 131072 / 64e9)


def test_a_trace_slice_kv_reaches_the_oracle_round_robin_does_not():
    # the 155 requests of at most 10,000 prompt tokens of tests/data's 300-line slice (light
    # load): kv serves every prefix an infinite shared cache would, round robin less
    path = Path(__file__).resolve().parents[1] / "data" / "synthetic_trace_300.jsonl"
    small = [r for r in load_trace(path) if r.input_length <= 10_000]
    cached = {}
    for router in ("kv", "round_robin"):
        replay = DisaggReplay(ReplayConfig(trace=path, router=router, prefill_workers=2,
                                           decode_workers=2), small)
        report = replay.run()
        assert (report.completed, report.failed, report.oracle_hit_tokens) == (155, 0, 22464)
        assert report.disagg.remote + report.disagg.local == 155
        cached[router] = report.cached_tokens
        drained(replay)
    assert cached == {"kv": 22464, "round_robin": 19840}
