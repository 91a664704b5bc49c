"""Worker.GenerateStream (many requests over one call) on a real WorkerServer with a mocker
engine: the worker side through a raw grpc.aio bidi call (first empty message, exact tokens per
request, refusals as error chunks, cancels and a closed call free blocks, draining at stop),
and the frontend side (WorkerStream: concurrent requests, cancel, fallback to Generate for a
worker without GenerateStream, a worker going away) up to a Frontend's text."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from ferry.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from orchestrator.frontend import Frontend, FrontendConfig
from orchestrator.frontend.types import FinishReason, GenerateInput
from orchestrator.frontend.worker_pool import generate_stream
from orchestrator.frontend.worker_stream import StreamCall, WorkerStream
from tests.helpers.fake_worker import MODEL, FakeWorker, write_tokenizer_folder
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.types import EngineRequest, SamplingParams
from workers.mocker.clock import WallClock
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel
from workers.server.generate_stream import DISAGG_ON_STREAM, DRAINING
from workers.server.worker import WorkerConfig, WorkerServer
from workers.tokenizer import Tokenizer

VOCAB = 384
MAX_LEN = 1024
CFG = EngineConfig(block_size=4, num_blocks=256, hash_seed=7)
ERROR = common_pb2.FINISH_REASON_ERROR
LENGTH = common_pb2.FINISH_REASON_LENGTH


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def fast_runner() -> MockerRunner:
    return MockerRunner(VOCAB, MAX_LEN)


def slow_runner() -> MockerRunner:
    """Real time, about 6 ms per decode step."""
    return MockerRunner(VOCAB, MAX_LEN, timing=TimingModel(), clock=WallClock())


@contextlib.asynccontextmanager
async def serving(runner: MockerRunner, **worker_kw):
    worker_kw.setdefault("worker_id", "w-stream")
    worker_kw.setdefault("model", MODEL)
    server = WorkerServer(LLMEngine(runner, CFG), WorkerConfig(**worker_kw))
    address = await server.start()
    channel = grpc.aio.insecure_channel(address)
    try:
        yield server, worker_pb2_grpc.WorkerStub(channel)
    finally:
        await channel.close()
        await server.stop(0.5)


def wire_request(rid: str, prompt, **sampling) -> worker_pb2.WorkerGenerateRequest:
    sampling.setdefault("max_tokens", 8)
    return worker_pb2.WorkerGenerateRequest(request_id=rid, prompt_token_ids=list(prompt),
                                            sampling=common_pb2.SamplingParams(**sampling))


def engine_tokens(requests: list[worker_pb2.WorkerGenerateRequest]) -> dict[str, tuple]:
    engine = LLMEngine(fast_runner(), CFG)
    return {f.request_id: f.token_ids for f in engine.generate([
        EngineRequest(r.request_id, tuple(r.prompt_token_ids),
                      SamplingParams(max_tokens=r.sampling.max_tokens)) for r in requests])}


async def read_until_finished(call, rids: set[str]) -> dict[str, list]:
    """Chunks per request id until every one of ``rids`` got its finished chunk."""
    got: dict[str, list] = {}
    left = set(rids)
    while left:
        msg = await call.read()
        assert msg is not grpc.aio.EOF, f"the stream ended with {left} unfinished"
        for chunk in msg.chunks:
            got.setdefault(chunk.request_id, []).append(chunk)
            if chunk.finished:
                left.discard(chunk.request_id)
    return got


async def wait_no_blocks(stub, deadline_s: float = 3.0) -> worker_pb2.StatsResponse:
    end = time.monotonic() + deadline_s
    while True:
        s = await stub.Stats(worker_pb2.StatsRequest())
        if s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0:
            assert s.integrity_ok, s.integrity_detail
            return s
        assert time.monotonic() < end, f"blocks still in use: {s}"
        await asyncio.sleep(0.02)


PROMPTS = [list(range(1, 23)), list(range(1, 17)) + [200, 201], list(range(50, 61)), [9]]


# ---------------------------------------------------------------------- worker side


def test_many_requests_over_one_call_get_the_engines_tokens():
    requests = [wire_request(f"r{i}", p, max_tokens=3 + 4 * i) for i, p in enumerate(PROMPTS)]
    want = engine_tokens(requests)

    async def main():
        async with serving(fast_runner(), stream_interval_s=0.0) as (_, stub):
            call = stub.GenerateStream()
            first = await call.read()
            assert list(first.chunks) == []  # the stream is open
            await call.write(worker_pb2.GenerateStreamRequest(requests=requests[:2]))
            await call.write(worker_pb2.GenerateStreamRequest(requests=requests[2:]))
            got = await read_until_finished(call, set(want))
            for rid, chunks in got.items():
                assert [t for c in chunks for t in c.new_token_ids] == list(want[rid])
                assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
                assert chunks[-1].finish_reason == LENGTH
                prompt = next(r.prompt_token_ids for r in requests if r.request_id == rid)
                assert chunks[-1].num_prompt_tokens == len(prompt)
            await call.done_writing()  # no more requests: the worker ends the call
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            await wait_no_blocks(stub)

    run(main())


@pytest.mark.parametrize("request_, words", [
    (wire_request("empty", []), "empty"),
    (wire_request("big", [VOCAB + 5]), "vocab"),
    (wire_request("neg", [1, 2], temperature=-1.0), "temperature"),
    (worker_pb2.WorkerGenerateRequest(request_id="p", prompt_token_ids=[1, 2], prefill_only=True),
     DISAGG_ON_STREAM),
])
def test_refused_requests_are_one_error_chunk_and_the_stream_goes_on(request_, words):
    async def main():
        async with serving(fast_runner()) as (_, stub):
            call = stub.GenerateStream()
            await call.read()
            await call.write(worker_pb2.GenerateStreamRequest(
                requests=[request_, wire_request("ok", [1, 2, 3], max_tokens=4)]))
            got = await read_until_finished(call, {request_.request_id, "ok"})
            (bad,) = got[request_.request_id]
            assert bad.finished and bad.finish_reason == ERROR
            assert bad.error.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
            assert words in bad.error.message.lower() or words in bad.error.message
            assert sum(len(c.new_token_ids) for c in got["ok"]) == 4
            call.cancel()
            await wait_no_blocks(stub)

    run(main())


def test_duplicate_id_cancel_and_closing_the_call_free_the_blocks():
    async def main():
        async with serving(slow_runner(), stream_interval_s=0.0) as (_, stub):
            call = stub.GenerateStream()
            await call.read()
            long_a = wire_request("a", range(1, 30), max_tokens=400)
            long_b = wire_request("b", range(2, 31), max_tokens=400)
            await call.write(worker_pb2.GenerateStreamRequest(requests=[long_a, long_b]))
            seen: set[str] = set()
            while seen != {"a", "b"}:
                seen.update(c.request_id for c in (await call.read()).chunks)
            await call.write(worker_pb2.GenerateStreamRequest(
                requests=[wire_request("a", [5, 6])], cancel=["b"]))
            dup = None
            while dup is None:
                for c in (await call.read()).chunks:
                    assert c.request_id != "b" or not c.finished  # nothing ends b: cancelled
                    if c.request_id == "a" and c.finished:
                        dup = c
            assert dup.finish_reason == ERROR and "already running" in dup.error.message
            s = await stub.Stats(worker_pb2.StatsRequest())
            assert s.num_running == 1  # "a" still runs, "b" was cancelled
            call.cancel()  # the frontend goes away: "a" is aborted too
            await wait_no_blocks(stub)

    run(main())


def test_stop_drains_the_stream_new_requests_are_refused_with_unavailable():
    async def main():
        server = WorkerServer(LLMEngine(slow_runner(), CFG),
                              WorkerConfig(worker_id="w-drain", model=MODEL))
        address = await server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.GenerateStream()
            await call.read()
            await call.write(worker_pb2.GenerateStreamRequest(
                requests=[wire_request("long", range(1, 30), max_tokens=400)]))
            while not (await call.read()).chunks:
                pass
            stopping = asyncio.ensure_future(server.stop(0.3))
            await asyncio.sleep(0.05)
            await call.write(worker_pb2.GenerateStreamRequest(
                requests=[wire_request("late", [1, 2, 3])]))
            got = await read_until_finished(call, {"late", "long"})
            (late,) = got["late"]
            assert late.error.code == common_pb2.ERROR_CODE_UNAVAILABLE
            assert late.error.message == DRAINING
            last = got["long"][-1]
            assert last.finish_reason == ERROR
            assert last.error.code == common_pb2.ERROR_CODE_ABORTED  # the grace ran out
            assert await call.read() is grpc.aio.EOF
            await stopping

    run(main())


# ---------------------------------------------------------------------- frontend side


async def stream_tokens(ws: WorkerStream, request) -> tuple[list[int], list]:
    call = ws.generate(request)
    chunks = [c async for c in call]
    return [t for c in chunks for t in c.new_token_ids], chunks


def stream_of(stub, address: str, kind: str, worker_id: str = "w-stream") -> WorkerStream:
    """A WorkerStream whose GenerateStream is grpc.aio's call or the frontend's BidiCall."""
    if kind == "bidi":
        return WorkerStream(stub, worker_id, generate_stream(address))
    return WorkerStream(stub, worker_id)


KINDS = ("grpc.aio", "bidi")


@pytest.mark.parametrize("kind", KINDS)
def test_worker_stream_carries_concurrent_requests_and_cancels(kind):
    requests = [wire_request(f"c{i}", PROMPTS[i % 4] + [i], max_tokens=2 + i % 9)
                for i in range(24)]
    want = engine_tokens(requests)

    async def main():
        async with serving(fast_runner()) as (server, stub):
            ws = stream_of(stub, server.address, kind)
            calls = [ws.generate(r) for r in requests]
            assert all(isinstance(c, StreamCall) for c in calls)
            results = await asyncio.gather(*(stream_tokens(ws, r) for r in requests))
            assert ws.supported is True
            for r, (tokens, chunks) in zip(requests, results):
                assert tokens == list(want[r.request_id])
                assert chunks[-1].finished and chunks[-1].finish_reason == LENGTH
            assert ws.num_running == 0
            # prefill_only goes through Generate (the worker refuses it on the stream)
            assert not isinstance(ws.generate(worker_pb2.WorkerGenerateRequest(
                request_id="p", prompt_token_ids=[1], prefill_only=True)), StreamCall)
            await ws.close()
            await wait_no_blocks(stub)

        async with serving(slow_runner()) as (server, stub):
            ws = stream_of(stub, server.address, kind)
            call = ws.generate(wire_request("long", range(1, 30), max_tokens=400))
            first = await call.__anext__()
            assert first.new_token_ids
            assert call.cancel() and not call.cancel()
            with pytest.raises(StopAsyncIteration):
                await call.__anext__()
            await wait_no_blocks(stub)
            assert ws.num_running == 0
            await ws.close()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_worker_without_generate_stream_falls_back_to_generate(tmp_path, kind):
    tokenizer = Tokenizer.from_hf_folder(write_tokenizer_folder(tmp_path))

    async def main():
        eos = tokenizer.eos_token_ids[0]
        fake = FakeWorker([5, 6, 7], eos, vocab_size=tokenizer.vocab_size)
        address = await fake.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                ws = stream_of(worker_pb2_grpc.WorkerStub(channel), address, kind, "fake")
                tokens, chunks = await stream_tokens(ws, wire_request("f1", [1, 2], max_tokens=5))
                assert ws.supported is False
                assert tokens == [5, 6, 7, eos, 5] and chunks[-1].finish_reason == LENGTH
                call = ws.generate(wire_request("f2", [1, 2], max_tokens=2))
                assert not isinstance(call, StreamCall)  # known now: a Generate call at once
                assert [t async for c in call for t in c.new_token_ids] == [5, 6]
        finally:
            await fake.stop()

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_going_away_fails_its_requests_and_the_next_one_reports_it(kind):
    async def main():
        server = WorkerServer(LLMEngine(slow_runner(), CFG),
                              WorkerConfig(worker_id="w-gone", model=MODEL))
        address = await server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            ws = stream_of(worker_pb2_grpc.WorkerStub(channel), address, kind, "w-gone")
            call = ws.generate(wire_request("doomed", range(1, 30), max_tokens=400))
            await call.__anext__()
            await server.stop(0.0)
            tail = []
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for chunk in call:  # an ABORTED chunk, or the broken stream itself
                    tail.append(chunk)
            if tail:
                assert tail[-1].error.code == common_pb2.ERROR_CODE_ABORTED
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stream_tokens(ws, wire_request("after", [1, 2]))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            await ws.close()

    run(main())


def test_frontend_text_over_generate_stream_equals_the_engines(tmp_path):
    tokenizer = Tokenizer.from_hf_folder(write_tokenizer_folder(tmp_path))

    async def main():
        async with serving(fast_runner()) as (server, stub):
            frontend = Frontend(tokenizer, FrontendConfig(model_name=MODEL))
            await frontend.add_worker("w0", server.address)
            try:
                prompts = [f"tell me {i} things" for i in range(6)]
                done = await asyncio.gather(*(frontend.complete(GenerateInput(
                    prompt=p, max_tokens=7, ignore_eos=True, temperature=0.0))
                    for p in prompts))
                handle = frontend.pool.get("w0")
                assert handle.stream.supported is True
                engine = LLMEngine(fast_runner(), CFG)
                for p, c in zip(prompts, done):
                    ids = tuple(tokenizer.encode(p, add_special_tokens=True))
                    [want] = engine.generate([EngineRequest(
                        "x", ids, SamplingParams(max_tokens=7, ignore_eos=True))])
                    assert c.token_ids == want.token_ids
                    assert c.text == tokenizer.decode(list(want.token_ids))
                    assert c.finish_reason is FinishReason.LENGTH
                    assert c.usage.completion_tokens == 7
            finally:
                await frontend.close()
            await wait_no_blocks(stub)

    run(main())


def test_a_lagging_consumer_gets_the_piled_up_chunks_merged():
    request = wire_request("lag", PROMPTS[0], max_tokens=12)
    want = engine_tokens([request])["lag"]

    async def main():
        async with serving(slow_runner(), stream_interval_s=0.0) as (_, stub):
            ws = WorkerStream(stub, "w-stream")
            call = ws.generate(request)
            first = await call.__anext__()
            k = len(first.new_token_ids)
            assert 1 <= k < 12 and list(first.new_token_ids) == list(want[:k])
            await wait_no_blocks(stub)  # the worker is done: every chunk reached the frontend
            rest = [c async for c in call]
            assert len(rest) == 1  # all that piled up, as one chunk
            assert list(rest[0].new_token_ids) == list(want[k:])
            assert rest[0].finished and rest[0].finish_reason == LENGTH
            assert rest[0].num_prompt_tokens == len(PROMPTS[0])
            await ws.close()

    run(main())


def test_an_idle_stream_survives_keepalive_pings():
    """The worker's server answers the frontend's idle pings however often they come (grpc's
    default policy would close the connection after a few at this rate)."""
    from ferry.rpc.client import BidiCall

    async def main():
        async with serving(fast_runner()) as (server, _):
            call = BidiCall(server.address, "/ferry.v1.Worker/GenerateStream",
                            worker_pb2.GenerateStreamRequest.SerializeToString,
                            worker_pb2.GenerateStreamResponse.FromString,
                            keepalive_s=0.2, keepalive_timeout_s=0.2)
            assert await call.read() == worker_pb2.GenerateStreamResponse()  # opened
            await asyncio.sleep(2.0)  # ~10 pings
            assert not call.done()
            await call.write(worker_pb2.GenerateStreamRequest(
                requests=[wire_request("after-idle", [1, 2, 3], max_tokens=2)]))
            got = await read_until_finished(call, {"after-idle"})
            assert got["after-idle"][-1].finish_reason == LENGTH
            call.cancel()

    run(main())
