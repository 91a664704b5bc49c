"""AsyncEngine over a mocker engine: exact tokens under concurrency, coalescing, cancellation
and abort free blocks, engine failures end every stream, shutdown, hooks, idle sleep."""

from __future__ import annotations

import asyncio
import time

import pytest

from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RunnerOutput,
    SamplingParams,
)
from workers.mocker.clock import WallClock
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel
from workers.server.async_engine import SHUTDOWN_MESSAGE, AsyncEngine, EngineFailureOutput

VOCAB = 300


def make_engine(runner: MockerRunner | None = None, **cfg) -> LLMEngine:
    cfg.setdefault("block_size", 4)
    cfg.setdefault("num_blocks", 256)
    return LLMEngine(runner or MockerRunner(VOCAB, 1024), EngineConfig(**cfg))


def slow_runner() -> MockerRunner:
    """Real time, about 6 ms per decode step: a 400-token request runs for seconds."""
    return MockerRunner(VOCAB, 1024, timing=TimingModel(), clock=WallClock())


def req(rid: str, prompt, max_tokens: int = 8) -> EngineRequest:
    return EngineRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens))


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(aeng: AsyncEngine, request: EngineRequest):
    tokens, outs = [], []
    async for out in aeng.generate(request):
        tokens.extend(out.new_token_ids)
        outs.append(out)
    return tokens, outs


async def wait_idle(aeng: AsyncEngine, deadline_s: float = 5.0):
    """Poll (on the engine thread) until nothing runs and no block is in use."""
    end = time.monotonic() + deadline_s
    while True:
        stats, busy = await aeng.call(lambda e: (e.stats(), e.has_unfinished()))
        if not busy and stats.kv_blocks_used == 0:
            return stats
        assert time.monotonic() < end, f"engine still busy: {stats}"
        await asyncio.sleep(0.01)


def requests_for_test(n: int) -> list[EngineRequest]:
    # shared prefixes (prefix-cache hits), various lengths and max_tokens
    base = list(range(1, 40))
    return [req(f"r{i}", base[: 5 + (i * 7) % 30] + [100 + i], max_tokens=1 + (i * 5) % 23)
            for i in range(n)]


def test_concurrent_generates_get_exactly_the_engines_tokens():
    requests = requests_for_test(40)
    expected = {f.request_id: f for f in make_engine().generate(requests)}

    async def main():
        aeng = AsyncEngine(make_engine())
        try:
            results = await asyncio.gather(*(collect(aeng, r) for r in requests))
            for r, (tokens, outs) in zip(requests, results):
                want = expected[r.request_id]
                assert tokens == list(want.token_ids), r.request_id
                assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
                assert outs[-1].finish_reason is want.finish_reason is FinishReason.LENGTH
                assert outs[-1].num_output_tokens == len(tokens) == r.sampling.max_tokens
                assert all(o.num_prompt_tokens == len(r.prompt_token_ids) for o in outs)
            await wait_idle(aeng)
            await aeng.call(lambda e: e.check_integrity())
            assert aeng.stats().kv_blocks_used == 0
        finally:
            aeng.shutdown()

    run(main())


class LetterTokenizer:
    """Token i decodes to one letter (i % 26); no EOS."""

    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcdefghijklmnopqrstuvwxyz"[i % 26] for i in ids)


def test_lagging_consumer_gets_one_coalesced_delta():
    request = req("slow-reader", range(1, 11), max_tokens=12)
    [want] = LLMEngine(MockerRunner(VOCAB, 1024), EngineConfig(block_size=4, num_blocks=256),
                       LetterTokenizer()).generate([request])
    assert len(want.text) == 12

    async def main():
        aeng = AsyncEngine(LLMEngine(MockerRunner(VOCAB, 1024),
                                     EngineConfig(block_size=4, num_blocks=256),
                                     LetterTokenizer()))
        try:
            stream = aeng.generate(request)
            # all 12 outputs are delivered before the engine answers this call
            while await aeng.call(lambda e: e.has_unfinished()):
                await asyncio.sleep(0.005)
            outs = [o async for o in stream]
            assert len(outs) == 1
            assert outs[0].new_token_ids == want.token_ids
            assert outs[0].new_text == want.text
            assert outs[0].finished and outs[0].finish_reason is FinishReason.LENGTH
            assert outs[0].num_output_tokens == 12
        finally:
            aeng.shutdown()

    run(main())


def test_invalid_requests_raise_before_streaming_and_engine_stays_healthy():
    async def main():
        aeng = AsyncEngine(make_engine(slow_runner()))
        try:
            with pytest.raises(InvalidRequestError, match="prompt is empty"):
                await collect(aeng, req("empty", []))
            with pytest.raises(InvalidRequestError, match=r"outside the vocabulary \[0, 300\)"):
                await collect(aeng, req("oov", [1, 2, 300]))
            first = aeng.generate(req("dup", range(1, 9), 400))
            out = await first.__anext__()  # running now, for seconds
            with pytest.raises(InvalidRequestError, match="already in use"):
                async for _ in aeng.generate(req("dup", range(1, 9), 4)):
                    pass
            # the rejected duplicate did not touch the first one
            out2 = await first.__anext__()
            assert out.num_output_tokens < out2.num_output_tokens and not out2.finished
            first.cancel()
            tokens, outs = await collect(aeng, req("ok", range(1, 9), 3))
            assert len(tokens) == 3 and outs[-1].finish_reason is FinishReason.LENGTH
            await wait_idle(aeng)
            await aeng.call(lambda e: e.check_integrity())
        finally:
            aeng.shutdown()

    run(main())


def test_cancelling_the_consumer_aborts_and_frees_its_blocks():
    async def main():
        aeng = AsyncEngine(make_engine(slow_runner()))
        try:
            got: list[int] = []

            async def consume():
                async for out in aeng.generate(req("long", range(1, 30), max_tokens=400)):
                    got.extend(out.new_token_ids)

            task = asyncio.ensure_future(consume())
            while len(got) < 3:
                await asyncio.sleep(0.005)
            assert aeng.stats().kv_blocks_used > 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stats = await wait_idle(aeng, 2.0)  # well before the 400 tokens would be done
            assert stats.num_running == stats.num_waiting == 0
            assert len(got) < 400
            await aeng.call(lambda e: e.check_integrity())
        finally:
            aeng.shutdown()

    run(main())


def test_explicit_cancel_and_dropped_stream_abort_too():
    async def main():
        aeng = AsyncEngine(make_engine(slow_runner()))
        try:
            stream = aeng.generate(req("a", range(1, 30), max_tokens=400))
            first = await stream.__anext__()
            assert first.new_token_ids and not first.finished
            stream.cancel()
            assert [o async for o in stream] == []  # nothing more after cancel
            await wait_idle(aeng, 2.0)

            stream = aeng.generate(req("b", range(1, 30), max_tokens=400))
            await stream.__anext__()
            del stream  # dropped without closing: still aborted
            await wait_idle(aeng, 2.0)
            await aeng.call(lambda e: e.check_integrity())
        finally:
            aeng.shutdown()

    run(main())


def test_abort_by_id_ends_the_stream_with_abort():
    async def main():
        aeng = AsyncEngine(make_engine(slow_runner()))
        try:
            stream = aeng.generate(req("x", range(1, 30), max_tokens=400))
            await stream.__anext__()
            assert await aeng.abort("x") is True
            outs = [o async for o in stream]
            assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT
            assert await aeng.abort("x") is False
            assert await aeng.abort("never-seen") is False
            await wait_idle(aeng, 2.0)
        finally:
            aeng.shutdown()

    run(main())


class FailOnceRunner(MockerRunner):
    """Real time (a 50-token request lasts ~0.3 s); raises once, at the first pass that holds
    three sequences with ``after`` tokens or more each."""

    def __init__(self, after: int) -> None:
        super().__init__(VOCAB, 1024, timing=TimingModel(), clock=WallClock())
        self.after = after
        self.failed = False

    def execute(self, batch) -> RunnerOutput:
        if not self.failed and len(batch.seqs) >= 3 and \
                all(s.num_output_tokens >= self.after for s in batch.seqs):
            self.failed = True
            raise RuntimeError("boom: the device fell over")
        return super().execute(batch)


def test_engine_step_exception_ends_every_stream_with_error_and_recovers(caplog):
    requests = [req(f"f{i}", range(1 + i, 12 + i), max_tokens=50) for i in range(3)]
    expected = {f.request_id: f.token_ids for f in make_engine().generate(requests)}

    async def main():
        runner = FailOnceRunner(after=2)
        aeng = AsyncEngine(make_engine(runner))
        try:
            results = await asyncio.gather(*(collect(aeng, r) for r in requests))
            assert runner.failed
            for r, (tokens, outs) in zip(requests, results):
                last = outs[-1]
                assert isinstance(last, EngineFailureOutput) and last.code == "internal"
                assert last.finished and last.finish_reason is FinishReason.ERROR
                assert "boom: the device fell over" in last.error
                assert 2 <= len(tokens) < 50
                assert tuple(tokens) == expected[r.request_id][: len(tokens)]
            await wait_idle(aeng)
            await aeng.call(lambda e: e.check_integrity())
            tokens, outs = await collect(aeng, req("after", range(1, 12), max_tokens=5))
            assert len(tokens) == 5 and outs[-1].finish_reason is FinishReason.LENGTH
        finally:
            aeng.shutdown()

    run(main())
    assert "engine step failed" in caplog.text


class CrashingEngine(LLMEngine):
    """An engine whose bookkeeping breaks outside ``step()`` once ``broken`` is set."""

    broken = False

    def has_unfinished(self) -> bool:
        if self.broken:
            raise KeyError("corrupted request table")
        return super().has_unfinished()


def test_a_crashed_engine_thread_ends_every_stream_and_refuses_new_work(caplog):
    async def main():
        engine = CrashingEngine(slow_runner(), EngineConfig(block_size=4, num_blocks=256))
        aeng = AsyncEngine(engine)
        stream = aeng.generate(req("c", range(1, 30), max_tokens=400))
        await stream.__anext__()
        engine.broken = True
        outs = [o async for o in stream]
        assert isinstance(outs[-1], EngineFailureOutput) and outs[-1].code == "internal"
        assert "engine thread crashed" in outs[-1].error
        late = [o async for o in aeng.generate(req("late", [1, 2, 3]))]
        assert late[-1].finish_reason is FinishReason.ERROR and late[-1].code == "shutdown"
        await asyncio.to_thread(aeng.shutdown)
        assert not aeng.is_running

    run(main())
    assert "the engine thread crashed" in caplog.text


def test_on_step_sees_every_step_and_a_failing_hook_does_not_stop_serving(caplog):
    seqs: list[int] = []
    calls = 0

    def hook(result):
        nonlocal calls
        calls += 1
        if result.kv_events is not None:
            seqs.append(result.kv_events.seq)
        if calls == 2:
            raise ValueError("hook bug")

    async def main():
        aeng = AsyncEngine(make_engine(), on_step=hook)
        try:
            results = await asyncio.gather(*(collect(aeng, r) for r in requests_for_test(10)))
            assert all(outs[-1].finish_reason is FinishReason.LENGTH for _, outs in results)
        finally:
            aeng.shutdown()

    run(main())
    assert calls >= 23  # the longest request alone needs 23 steps
    assert seqs == list(range(len(seqs))) and seqs  # every KV batch, in order, no gap
    assert "on_step hook failed" in caplog.text


def test_shutdown_ends_running_streams_and_refuses_new_work():
    async def main():
        aeng = AsyncEngine(make_engine(slow_runner()))
        stream = aeng.generate(req("s", range(1, 30), max_tokens=400))
        await stream.__anext__()
        await asyncio.to_thread(aeng.shutdown)
        assert not aeng.is_running
        outs = [o async for o in stream]
        assert isinstance(outs[-1], EngineFailureOutput) and outs[-1].code == "shutdown"
        assert outs[-1].error == SHUTDOWN_MESSAGE
        late = [o async for o in aeng.generate(req("late", [1, 2, 3]))]
        assert len(late) == 1 and late[0].finish_reason is FinishReason.ERROR
        assert late[0].code == "shutdown"
        with pytest.raises(RuntimeError, match="shut down"):
            await aeng.call(lambda e: None)
        assert await aeng.abort("s") is False

    run(main())


def test_idle_engine_thread_sleeps():
    async def main():
        aeng = AsyncEngine(make_engine())
        try:
            await collect(aeng, req("warm", range(1, 9), 2))
            cpu = time.process_time()
            await asyncio.sleep(0.3)
            assert time.process_time() - cpu < 0.1  # a busy loop would burn ~0.3 s
        finally:
            aeng.shutdown()

    run(main())


def test_call_propagates_exceptions_and_generate_needs_an_engine_request():
    async def main():
        aeng = AsyncEngine(make_engine())
        try:
            with pytest.raises(ZeroDivisionError):
                await aeng.call(lambda e: 1 / 0)
            assert await aeng.call(lambda e: e.vocab_size) == VOCAB
            with pytest.raises(TypeError, match="EngineRequest"):
                aeng.generate({"request_id": "x"})
        finally:
            aeng.shutdown()

    run(main())
    with pytest.raises(TypeError, match="LLMEngine"):
        AsyncEngine(object())


# ---------------------------------------------------------------------- submit (callback form)

class Recorder:
    """on_output for AsyncEngine.submit: every item with the loop time it arrived."""

    def __init__(self) -> None:
        self.items: list = []
        self.times: list[float] = []
        self.done = asyncio.get_running_loop().create_future()

    def __call__(self, item) -> None:
        self.items.append(item)
        self.times.append(asyncio.get_running_loop().time())
        if (isinstance(item, BaseException) or item.finished) and not self.done.done():
            self.done.set_result(None)

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.items for t in o.new_token_ids]


def test_submit_without_pacing_delivers_one_delta_per_step():
    request = req("cb", range(1, 12), max_tokens=9)
    [want] = make_engine().generate([request])

    async def main():
        aeng = AsyncEngine(make_engine())
        try:
            rec = Recorder()
            sub = aeng.submit(request, rec)
            await rec.done
            assert rec.tokens == list(want.token_ids)
            assert [len(o.new_token_ids) for o in rec.items] == [1] * 9
            assert rec.items[-1].finish_reason is FinishReason.LENGTH and sub.done
            await wait_idle(aeng)
        finally:
            aeng.shutdown()

    run(main())


def test_submit_paces_on_the_engine_thread_and_never_holds_the_last_delta():
    # ~6 ms per decode step: 40 tokens take ~250 ms; at most one delta per 50 ms.
    request = req("paced", range(1, 12), max_tokens=40)
    [want] = make_engine().generate([request])

    async def main():
        aeng = AsyncEngine(make_engine(slow_runner()))
        try:
            rec = Recorder()
            aeng.submit(request, rec, min_interval_s=0.05)
            await rec.done
            finished_at = asyncio.get_running_loop().time()
            assert rec.tokens == list(want.token_ids)
            assert len(rec.items[0].new_token_ids) == 1  # the first delta is never held
            assert 3 <= len(rec.items) <= 8
            gaps = [b - a for a, b in zip(rec.times, rec.times[1:-1])]
            assert all(g >= 0.045 for g in gaps), gaps  # loop time vs engine clock: 5 ms slack
            assert rec.items[-1].finished and rec.items[-1].num_output_tokens == 40
            assert finished_at - rec.times[-1] < 0.05
            with pytest.raises(ValueError, match="min_interval_s"):
                aeng.submit(req("bad", [1, 2]), rec, min_interval_s=-1)
        finally:
            aeng.shutdown()

    run(main())


def test_submit_cancel_stops_delivery_and_frees_blocks():
    async def main():
        aeng = AsyncEngine(make_engine(slow_runner()))
        try:
            rec = Recorder()
            first = asyncio.get_running_loop().create_future()
            sub = aeng.submit(req("gone", range(1, 30), max_tokens=400),
                              lambda item: (rec(item), first.done() or first.set_result(None)),
                              min_interval_s=0.01)
            await first
            sub.cancel()
            n = len(rec.items)
            assert sub.done
            await wait_idle(aeng)
            await asyncio.sleep(0.05)
            assert len(rec.items) == n  # nothing after cancel, not even what was under way
            assert not any(o.finished for o in rec.items)
        finally:
            aeng.shutdown()

    run(main())


def test_submit_refusal_failure_and_shutdown_are_items():
    requests = [req(f"f{i}", range(1 + i, 12 + i), max_tokens=50) for i in range(3)]
    expected = {f.request_id: f.token_ids for f in make_engine().generate(requests)}

    async def main():
        aeng = AsyncEngine(make_engine(FailOnceRunner(after=5)))
        try:
            bad = Recorder()
            aeng.submit(req("empty", []), bad)
            await bad.done
            assert len(bad.items) == 1 and isinstance(bad.items[0], InvalidRequestError)
            # a failing step: the tokens held by pacing still arrive, then the error
            recs = [Recorder() for _ in requests]
            for r, rec in zip(requests, recs):
                aeng.submit(r, rec, min_interval_s=10.0)
            await asyncio.gather(*(rec.done for rec in recs))
            for r, rec in zip(requests, recs):
                assert len(rec.items) == 3  # the first delta, the held ones, the failure
                last = rec.items[-1]
                assert isinstance(last, EngineFailureOutput) and last.code == "internal"
                assert 5 <= len(rec.tokens) < 50
                assert tuple(rec.tokens) == expected[r.request_id][: len(rec.tokens)]
        finally:
            aeng.shutdown()
        late = Recorder()
        sub = aeng.submit(req("late", [1, 2, 3]), late)
        await late.done
        assert late.items[0].code == "shutdown" and late.items[0].error == SHUTDOWN_MESSAGE
        assert sub.done

    run(main())
