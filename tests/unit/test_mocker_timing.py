"""Mocker: the virtual clock advances by exactly the timing formulas; fake tokens are a pure
function of the context (chunking, caching, preemption and block placement do not change
them)."""

from __future__ import annotations

import time

import pytest

from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.types import EngineRequest, SamplingParams, ScheduledBatch, ScheduledSeq
from workers.mocker.clock import VirtualClock, WallClock
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel

# the documented defaults, written out independently of the module
A, B, C = 4.209989e-7, 1.518344e-2, 16.50142
P, Q, R = -25.74, 54.01, 5.74


def prefill_ms(t: int) -> float:
    return A * t * t + B * t + C


def decode_ms(u: float) -> float:
    return max(1.0, P * u * u + Q * u + R)


def req(rid, prompt, max_tokens=4) -> EngineRequest:
    return EngineRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens))


def make(speedup: float = 1.0, budget: int = 2048, num_blocks: int = 10, **kw):
    clock = VirtualClock()
    runner = MockerRunner(1000, 256, TimingModel(speedup=speedup), clock, **kw)
    eng = LLMEngine(
        runner, EngineConfig(block_size=4, num_blocks=num_blocks, max_num_batched_tokens=budget)
    )
    return eng, clock


def advance_of(eng: LLMEngine, clock: VirtualClock) -> float:
    before = clock.now()
    res = eng.step()
    assert res.duration_s == clock.now() - before
    return clock.now() - before


def test_defaults_are_the_documented_coefficients():
    t = TimingModel()
    assert (t.a, t.b, t.c, t.p, t.q, t.r, t.speedup) == (A, B, C, P, Q, R, 1.0)


def test_prefill_decode_and_mixed_passes():
    eng, clock = make()
    eng.add_request(req("a", range(1, 31)))  # 30 tokens: 8 blocks of 10
    assert advance_of(eng, clock) == pytest.approx(prefill_ms(30) / 1000, rel=1e-12)
    # decode only: a holds 31 tokens -> 8 blocks of 10 in use after scheduling
    assert advance_of(eng, clock) == pytest.approx(decode_ms(8 / 10) / 1000, rel=1e-12)
    # mixed: b's 5-token prefill plus a's decode; 8 + 2 blocks in use
    eng.add_request(req("b", range(40, 45)))
    expected = (prefill_ms(5) + decode_ms(10 / 10)) / 1000
    assert advance_of(eng, clock) == pytest.approx(expected, rel=1e-12)


def test_chunk_and_speedup():
    eng, clock = make(speedup=2.5, budget=7)
    eng.add_request(req("a", range(1, 11)))
    assert advance_of(eng, clock) == pytest.approx(prefill_ms(7) / 2.5 / 1000, rel=1e-12)
    assert advance_of(eng, clock) == pytest.approx(prefill_ms(3) / 2.5 / 1000, rel=1e-12)
    assert advance_of(eng, clock) == pytest.approx(decode_ms(3 / 10) / 2.5 / 1000, rel=1e-12)


def test_decode_floor_and_empty_pass():
    t = TimingModel(p=0.0, q=0.0, r=0.25)
    assert t.decode_ms(0.5) == 1.0
    assert t.pass_ms(0, 0, 0.3) == 0.0
    assert t.pass_ms(0, 3, 0.0) == 1.0
    assert TimingModel().decode_ms(1.7) == TimingModel().decode_ms(1.0)  # usage clamped
    eng, clock = make()
    res = eng.step()  # nothing to do: no pass, no time
    assert (res.num_scheduled, res.duration_s, clock.now()) == (0, 0.0, 0.0)


def test_timing_validation():
    with pytest.raises(ValueError) as e:
        TimingModel(speedup=0)
    assert str(e.value) == "speedup must be > 0 (1.0 = as fitted), got 0"
    with pytest.raises(ValueError, match="timing coefficient a must be a finite number"):
        TimingModel(a=float("nan"))


def test_clocks():
    c = VirtualClock(5.0)
    c.advance(0.25)
    assert c.now() == 5.25
    c.advance_to(4.0)
    assert c.now() == 5.25
    c.advance_to(7.0)
    assert c.now() == 7.0
    with pytest.raises(ValueError):
        c.advance(-1.0)
    w = WallClock()
    t0 = w.now()
    w.advance(0.02)
    assert w.now() - t0 >= 0.02
    t1 = time.monotonic()
    assert abs(w.now() - t1) < 1.0


def test_tokens_independent_of_chunking_caching_and_placement():
    prompts = [list(range(1, 23)), list(range(1, 17)) + [500, 501], [7] * 9]
    results = []
    for budget, caching, blocks in ((2048, True, 64), (3, True, 64), (5, False, 64), (4, True, 8)):
        runner = MockerRunner(1000, 256)
        eng = LLMEngine(
            runner,
            EngineConfig(
                block_size=4,
                num_blocks=blocks,
                max_num_batched_tokens=budget,
                enable_prefix_caching=caching,
            ),
        )
        outs = eng.generate([req(f"r{i}", p, max_tokens=7) for i, p in enumerate(prompts)])
        results.append([o.token_ids for o in outs])
        assert eng.stats().num_preemptions == (3 if blocks == 8 else 0)
        assert all(0 <= t < 1000 for o in outs for t in o.token_ids)
    assert results[1:] == [results[0]] * 3
    assert len(set(results[0])) == 3  # different contexts, different tokens


def test_avoid_token_ids():
    free = MockerRunner(7, 64)
    eng = LLMEngine(free, EngineConfig(block_size=4, num_blocks=16))
    [o] = eng.generate([req("a", [1, 2, 3], max_tokens=30)])
    avoided = {o.token_ids[0], o.token_ids[1]}
    eng = LLMEngine(
        MockerRunner(7, 64, avoid_token_ids=avoided), EngineConfig(block_size=4, num_blocks=16)
    )
    [o2] = eng.generate([req("a", [1, 2, 3], max_tokens=30)])
    assert not avoided & set(o2.token_ids)
    with pytest.raises(ValueError, match="leaves no token"):
        MockerRunner(2, 64, avoid_token_ids=(0, 1))


def test_wrong_block_table_is_detected():
    runner = MockerRunner(100, 64)
    sp = SamplingParams()

    def seq(start, tokens, table):
        return ScheduledSeq("x", tuple(tokens), start, table, True, sp, 0, True)

    runner.execute(ScheduledBatch((seq(0, range(6), (3, 5)),), 4, 0.5))
    # continuing in block 5 at offset 2 works; claiming block 1 holds the first 4 does not
    runner.execute(ScheduledBatch((seq(6, [9], (3, 5)),), 4, 0.5))
    with pytest.raises(RuntimeError, match="block 1 .* holds no computed KV"):
        runner.execute(ScheduledBatch((seq(4, [1], (1, 2)),), 4, 0.5))
    with pytest.raises(RuntimeError, match="block 2 does not hold the 1 tokens"):
        runner.execute(ScheduledBatch((seq(5, [1], (3, 2)),), 4, 0.5))
