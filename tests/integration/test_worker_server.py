"""The Worker gRPC server on port 0 with a mocker engine, called by a real grpc.aio client:
streamed tokens equal the engine's own, exact Stats / Info, INVALID_ARGUMENT with messages,
client cancel and Abort free blocks, engine failure and shutdown end streams with an error
chunk, and (with a real nats-server) KV events and load reports reach a subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from ferry.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvcache.wire import LoadReport
from orchestrator.event_subscriber import EventSubscriber
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.types import EngineRequest, RunnerOutput, SamplingParams
from workers.mocker.clock import WallClock
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel
from workers.server.worker import WorkerConfig, WorkerRole, WorkerServer

VOCAB = 300
MAX_LEN = 1024
CFG = EngineConfig(block_size=4, num_blocks=256, hash_seed=7)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def fast_runner() -> MockerRunner:
    return MockerRunner(VOCAB, MAX_LEN)


def slow_runner() -> MockerRunner:
    """Real time, about 6 ms per decode step."""
    return MockerRunner(VOCAB, MAX_LEN, timing=TimingModel(), clock=WallClock())


class FailOnceRunner(MockerRunner):
    """Real time; raises once, at the first pass that holds three sequences."""

    def __init__(self) -> None:
        super().__init__(VOCAB, MAX_LEN, timing=TimingModel(), clock=WallClock())
        self.failed = False

    def execute(self, batch) -> RunnerOutput:
        if not self.failed and len(batch.seqs) >= 3:
            self.failed = True
            raise RuntimeError("boom: the device fell over")
        return super().execute(batch)


@contextlib.asynccontextmanager
async def serving(runner: MockerRunner, **worker_kw):
    worker_kw.setdefault("worker_id", "w-test")
    worker_kw.setdefault("model", "mock-model")
    server = WorkerServer(LLMEngine(runner, CFG), WorkerConfig(**worker_kw))
    address = await server.start()
    channel = grpc.aio.insecure_channel(address)
    try:
        yield server, worker_pb2_grpc.WorkerStub(channel)
    finally:
        await channel.close()
        await server.stop(0.5)


def wire_request(rid: str, prompt, **sampling) -> worker_pb2.WorkerGenerateRequest:
    msg = worker_pb2.WorkerGenerateRequest(request_id=rid, prompt_token_ids=list(prompt))
    if sampling:
        msg.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return msg


async def generate(stub, request) -> tuple[list[int], list]:
    chunks = [c async for c in stub.Generate(request)]
    return [t for c in chunks for t in c.new_token_ids], chunks


async def read_rest(call) -> list:
    """The remaining chunks of a call read with ``read()`` (iteration cannot be mixed in)."""
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


async def stats(stub) -> worker_pb2.StatsResponse:
    return await stub.Stats(worker_pb2.StatsRequest())


async def wait_no_blocks(stub, deadline_s: float = 3.0) -> worker_pb2.StatsResponse:
    end = time.monotonic() + deadline_s
    while True:
        s = await stats(stub)
        if s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0:
            return s
        assert time.monotonic() < end, f"blocks still in use: {s}"
        await asyncio.sleep(0.02)


def assert_well_formed(chunks, reason) -> None:
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.finish_reason for c in chunks[:-1]] == [0] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == reason


PROMPTS = [list(range(1, 23)), list(range(1, 17)) + [200, 201], list(range(50, 61)), [9]]


def test_generate_streams_the_engines_tokens_and_stats_and_info_are_exact():
    twin = LLMEngine(fast_runner(), CFG)
    want = [twin.generate([EngineRequest(f"s{i}", tuple(p), SamplingParams(max_tokens=5 + i))])[0]
            for i, p in enumerate(PROMPTS)]

    async def main():
        async with serving(fast_runner(), role="decode") as (_, stub):
            for i, prompt in enumerate(PROMPTS):  # one at a time: same cache hits as the twin
                tokens, chunks = await generate(stub, wire_request(f"s{i}", prompt,
                                                                   max_tokens=5 + i))
                assert tokens == list(want[i].token_ids)
                assert_well_formed(chunks, common_pb2.FINISH_REASON_LENGTH)
                last = chunks[-1]
                assert last.request_id == f"s{i}" and not last.HasField("error")
                assert last.num_prompt_tokens == len(prompt)
                assert last.num_cached_tokens == want[i].num_cached_tokens
            assert want[1].num_cached_tokens == 16  # the shared prefix was a cache hit

            s = await stats(stub)
            ts, tp = twin.stats(), twin.kv.prefix_stats()
            assert (s.worker_id, s.num_waiting, s.num_running, s.kv_blocks_used,
                    s.kv_blocks_total, s.active_prefill_tokens) == \
                ("w-test", 0, 0, ts.kv_blocks_used, 256, 0)
            assert (s.prefix_hit_tokens, s.prefix_query_tokens) == \
                (tp.hit_tokens, tp.queried_tokens) == (16, sum(map(len, PROMPTS)))
            assert s.integrity_ok and s.integrity_detail == ""

            info = await stub.Info(worker_pb2.InfoRequest())
            assert (info.worker_id, info.model, info.role, info.block_size, info.hash_seed,
                    info.num_blocks, info.max_model_len, info.vocab_size) == \
                ("w-test", "mock-model", common_pb2.WORKER_ROLE_DECODE, 4, 7, 256, MAX_LEN,
                 VOCAB)

    run(main())


def test_concurrent_streams_defaults_and_stop_token_ids():
    prompts = [list(range(1 + i, 10 + 2 * i)) for i in range(24)]
    twin = LLMEngine(fast_runner(), CFG)
    want = twin.generate([EngineRequest(f"c{i}", tuple(p), SamplingParams(max_tokens=3 + i))
                          for i, p in enumerate(prompts)])
    [default] = twin.generate([EngineRequest("d", (5, 6, 7))])  # max_tokens 16 by default
    stop_at = default.token_ids[2]
    first_stop = default.token_ids.index(stop_at)

    async def main():
        async with serving(fast_runner()) as (_, stub):
            results = await asyncio.gather(*(
                generate(stub, wire_request(f"c{i}", p, max_tokens=3 + i))
                for i, p in enumerate(prompts)))
            for w, (tokens, chunks) in zip(want, results):
                assert tokens == list(w.token_ids)
                assert_well_formed(chunks, common_pb2.FINISH_REASON_LENGTH)
            tokens, _ = await generate(stub, wire_request("d", [5, 6, 7]))  # no sampling set
            assert tokens == list(default.token_ids) and len(tokens) == 16
            tokens, chunks = await generate(stub, wire_request("stop", [5, 6, 7],
                                                               stop_token_ids=[stop_at]))
            assert tokens == list(default.token_ids[:first_stop + 1])
            assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
            s = await wait_no_blocks(stub)
            assert s.integrity_ok

    run(main())


@pytest.mark.parametrize("request_kw, message", [
    ({"prompt": []}, "the prompt is empty; send at least one prompt token"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"top_p": 2.0}, "top_p must be in (0, 1], got 2.0"),
    ({"temperature": -1.0}, "temperature must be a number >= 0 (0 means greedy), got -1.0"),
    ({"prompt": [1, 2, 300]}, "prompt token id 300 at position 2 is outside the vocabulary"),
    ({"prompt": list(range(1, 1025))}, "shorten the prompt to at most 1023 tokens"),
    ({"stop": ["x"]}, "stop strings need a tokenizer but this engine has none"),
    ({"rid": ""}, "request_id must be a non-empty string"),
])
def test_invalid_requests_fail_with_invalid_argument_and_server_stays_healthy(request_kw,
                                                                              message):
    async def main():
        async with serving(fast_runner()) as (_, stub):
            kw = dict(request_kw)
            rid, prompt = kw.pop("rid", "bad"), kw.pop("prompt", [1, 2, 3])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(stub, wire_request(rid, prompt, **kw))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()
            tokens, chunks = await generate(stub, wire_request("good", [1, 2, 3], max_tokens=4))
            assert len(tokens) == 4 and chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            s = await wait_no_blocks(stub)
            assert s.integrity_ok

    run(main())


def test_client_cancel_mid_stream_frees_the_blocks():
    async def main():
        async with serving(slow_runner()) as (_, stub):
            call = stub.Generate(wire_request("long", range(1, 30), max_tokens=400))
            got = 0
            async for chunk in call:
                got += len(chunk.new_token_ids)
                if got >= 3:
                    break
            assert (await stats(stub)).kv_blocks_used > 0
            call.cancel()
            s = await wait_no_blocks(stub, 2.0)  # 400 tokens would take seconds
            assert s.integrity_ok
            tokens, _ = await generate(stub, wire_request("next", range(1, 9), max_tokens=3))
            assert len(tokens) == 3

    run(main())


def test_abort_rpc_ends_the_stream_with_abort():
    async def main():
        async with serving(slow_runner()) as (_, stub):
            call = stub.Generate(wire_request("victim", range(1, 30), max_tokens=400))
            first = await call.read()
            assert first.new_token_ids and not first.finished
            resp = await stub.Abort(worker_pb2.AbortRequest(request_id="victim"))
            assert resp.found
            chunks = [first] + await read_rest(call)
            assert_well_formed(chunks, common_pb2.FINISH_REASON_ABORT)
            assert not (await stub.Abort(worker_pb2.AbortRequest(request_id="victim"))).found
            assert not (await stub.Abort(worker_pb2.AbortRequest(request_id="nope"))).found
            await wait_no_blocks(stub)

    run(main())


def test_engine_failure_is_a_final_error_chunk_and_the_server_recovers():
    async def main():
        async with serving(FailOnceRunner()) as (_, stub):
            results = await asyncio.gather(*(
                generate(stub, wire_request(f"f{i}", range(1 + i, 12 + i), max_tokens=50))
                for i in range(3)))
            for tokens, chunks in results:
                assert_well_formed(chunks, common_pb2.FINISH_REASON_ERROR)
                err = chunks[-1].error
                assert err.code == common_pb2.ERROR_CODE_INTERNAL
                assert "boom: the device fell over" in err.message
                assert len(tokens) < 50
            s = await wait_no_blocks(stub)
            assert s.integrity_ok
            tokens, chunks = await generate(stub, wire_request("after", [1, 2], max_tokens=4))
            assert len(tokens) == 4 and chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH

    run(main())


def test_stop_ends_an_inflight_stream_with_an_aborted_error_chunk():
    async def main():
        server = WorkerServer(LLMEngine(slow_runner(), CFG),
                              WorkerConfig(worker_id="w-stop", model="m"))
        address = await server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.Generate(wire_request("r", range(1, 30), max_tokens=400))
            first = await call.read()
            await server.stop(grace=0.2)
            chunks = [first] + await read_rest(call)
            assert_well_formed(chunks, common_pb2.FINISH_REASON_ERROR)
            assert chunks[-1].error.code == common_pb2.ERROR_CODE_ABORTED
            assert "shutting down" in chunks[-1].error.message

    run(main())


def test_worker_config_is_validated_and_a_busy_port_is_reported():
    with pytest.raises(ValueError, match="worker_id must be letters, digits"):
        WorkerConfig(worker_id="a.b", model="m")
    with pytest.raises(ValueError, match="role must be one of"):
        WorkerConfig(worker_id="w", model="m", role="boss")
    with pytest.raises(ValueError, match=r"port must be in \[0, 65535\]"):
        WorkerConfig(worker_id="w", model="m", port=70000)
    with pytest.raises(ValueError, match="load_report_interval_s must be"):
        WorkerConfig(worker_id="w", model="m", load_report_interval_s=0)
    with pytest.raises(ValueError, match="nats_url must look like"):
        WorkerConfig(worker_id="w", model="m", nats_url="localhost:4222")
    assert WorkerConfig(worker_id="w", model="m", role="prefill").role is WorkerRole.PREFILL

    async def main():
        async with serving(fast_runner()) as (server, _):
            port = int(server.address.rsplit(":", 1)[1])
            other = WorkerServer(LLMEngine(fast_runner(), CFG),
                                 WorkerConfig(worker_id="w2", model="m", port=port))
            with pytest.raises(OSError, match=f"could not bind .*127.0.0.1:{port}"):
                await other.start()

    run(main())


def reference_steps(engine: LLMEngine, requests: list[EngineRequest]):
    """Run requests one at a time, as the test sends them; the KV batches of every step."""
    batches = []
    for r in requests:
        engine.add_request(r)
        while engine.has_unfinished():
            result = engine.step()
            if result.kv_events is not None:
                batches.append(result.kv_events)
    return batches


def test_kv_events_and_load_reports_reach_a_subscriber(nats_server):
    requests = [EngineRequest(f"n{i}", tuple(p), SamplingParams(max_tokens=6))
                for i, p in enumerate(PROMPTS)]
    want = reference_steps(LLMEngine(fast_runner(), CFG), requests)
    assert len(want) >= 4

    async def main():
        kv: list = []
        loads: list[LoadReport] = []
        subscriber = EventSubscriber(
            nats_server.url, lambda wid, b: kv.append(b) if wid == "w-nats" else None,
            lambda r: loads.append(r) if r.worker_id == "w-nats" else None)
        await subscriber.start(timeout=5.0)
        try:
            async with serving(fast_runner(), worker_id="w-nats", nats_url=nats_server.url,
                               load_report_interval_s=0.02) as (_, stub):
                for r in requests:
                    await generate(stub, wire_request(r.request_id, r.prompt_token_ids,
                                                      max_tokens=6))
                end = time.monotonic() + 5.0
                while len(kv) < len(want) or not loads or loads[-1].kv_blocks_used:
                    assert time.monotonic() < end, f"got {len(kv)} batches, loads {loads[-1:]}"
                    await asyncio.sleep(0.02)
            assert kv == want  # same steps, same virtual clock: identical batches
            assert [b.seq for b in kv] == list(range(len(want)))
            idle = loads[-1]
            assert (idle.waiting, idle.running, idle.kv_blocks_used, idle.kv_blocks_total,
                    idle.active_prefill_tokens, idle.active_decode_blocks) == (0, 0, 0, 256, 0, 0)
        finally:
            await subscriber.close()

    run(main())


def test_load_reports_show_a_running_request(nats_server):
    async def main():
        loads: list[LoadReport] = []
        subscriber = EventSubscriber(
            nats_server.url, lambda wid, b: None,
            lambda r: loads.append(r) if r.worker_id == "w-load" else None)
        await subscriber.start(timeout=5.0)
        try:
            async with serving(slow_runner(), worker_id="w-load", nats_url=nats_server.url,
                               load_report_interval_s=0.02) as (_, stub):
                call = stub.Generate(wire_request("busy", range(1, 30), max_tokens=400))
                await call.read()
                end = time.monotonic() + 5.0
                while not any(r.running == 1 for r in loads):
                    assert time.monotonic() < end, f"no busy load report: {loads[-3:]}"
                    await asyncio.sleep(0.02)
                busy = next(r for r in loads if r.running == 1)
                # 29 prompt tokens + outputs in blocks of 4, all held by the decoding request
                assert busy.kv_blocks_used == busy.active_decode_blocks >= 8
                assert busy.kv_blocks_total == 256 and busy.waiting == 0
                call.cancel()
        finally:
            await subscriber.close()

    run(main())


def test_the_advertised_host_is_what_clients_and_kv_handles_dial():
    async def main():
        async with serving(fast_runner(), advertise_host="localhost") as (server, stub):
            assert server.address == f"localhost:{server.address.rsplit(':', 1)[1]}"
            info = await stub.Info(worker_pb2.InfoRequest())  # dialled through that name
            assert info.worker_id == "w-test"
            assert server.handles.transport_address.endswith(server.address)

    run(main())


@pytest.mark.parametrize("host, advertise, dialled", [
    ("127.0.0.1", None, "127.0.0.1:7"),
    ("0.0.0.0", None, "127.0.0.1:7"),  # one machine: loopback
    ("0.0.0.0", "10.1.2.3", "10.1.2.3:7"),  # a cluster: the node's address
    ("::", "fd00::5", "[fd00::5]:7"),
])
def test_dial_address(host, advertise, dialled):
    from workers.server.worker import _dial_address

    assert _dial_address(host, 7, advertise) == dialled


@pytest.mark.parametrize("advertise", ["", "0.0.0.0", "::", 5])
def test_a_wildcard_or_empty_advertise_host_is_refused(advertise):
    with pytest.raises(ValueError, match="advertise_host must be an address other machines"):
        WorkerConfig(worker_id="w", model="m", advertise_host=advertise)
