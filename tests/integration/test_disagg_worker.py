"""Disaggregation between two real worker gRPC servers (tiny random Llama on the torch runner,
and mocker engines): a prefill worker hands out a KV handle, a decode worker pulls it over
gRPC and decodes the same greedy tokens as one aggregated worker, computing only the rest of
the prompt; handles are released (by the puller, by TTL, at shutdown); a failed pull (holder
gone, handle released) is a local prefill; a cancelled pull leaves no block in use."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

import grpc
import pytest

from ferry.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.factory import build_torch_engine
from workers.mocker.clock import WallClock
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel
from workers.server.worker import WorkerConfig, WorkerServer

pytestmark = pytest.mark.timeout(120)

BS = 4
CFG = EngineConfig(block_size=BS, num_blocks=128)


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny"))


class Worker:
    def __init__(self, engine: LLMEngine, worker_id: str, role: str, **kw) -> None:
        self.server = WorkerServer(engine, WorkerConfig(worker_id=worker_id, model="m",
                                                        role=role, **kw))
        self.address = ""
        self.channel: grpc.aio.Channel | None = None
        self.stub: worker_pb2_grpc.WorkerStub | None = None

    async def __aenter__(self) -> Self:
        self.address = await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(0.5)

    async def stats(self) -> worker_pb2.StatsResponse:
        return await self.stub.Stats(worker_pb2.StatsRequest())

    async def generate(self, rid: str, prompt, max_tokens: int, *, prefill_only=False,
                       handle=None) -> tuple[list[int], worker_pb2.WorkerGenerateResponse]:
        msg = worker_pb2.WorkerGenerateRequest(
            request_id=rid, prompt_token_ids=list(prompt), prefill_only=prefill_only,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                               ignore_eos=True))
        if handle is not None:
            msg.remote_prefill.CopyFrom(handle)
        tokens: list[int] = []
        last = None
        async for chunk in self.stub.Generate(msg):
            tokens.extend(chunk.new_token_ids)
            last = chunk
        assert last.finished and not last.HasField("error"), last
        return tokens, last


def torch_pair(folder):
    p = build_torch_engine(str(folder), CFG).engine
    d = build_torch_engine(str(folder), CFG).engine
    return p, d


async def no_blocks_in_use(*workers: Worker) -> None:
    for w in workers:
        for _ in range(100):  # releases run on the engine thread, just after the call
            s = await w.stats()
            if s.kv_blocks_used == 0:
                break
            await asyncio.sleep(0.02)
        assert (s.kv_blocks_used, s.integrity_ok) == (0, True), s


PROMPT = tuple(20 + (i * 37) % 300 for i in range(23))  # 5 full blocks and 3 tokens


def test_prefill_then_decode_equals_aggregated_and_computes_only_the_rest(tiny_folder):
    async def main():
        agg_engine = build_torch_engine(str(tiny_folder), CFG).engine
        p_eng, d_eng = torch_pair(tiny_folder)
        async with Worker(agg_engine, "agg", "aggregated") as agg, \
                Worker(p_eng, "pre", "prefill") as p, Worker(d_eng, "dec", "decode") as d:
            whole, _ = await agg.generate("a", PROMPT, 10)
            first, last = await p.generate("r1", PROMPT, 10, prefill_only=True)
            assert len(first) == 1 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            h = last.kv_handle
            assert (h.worker_id, h.num_tokens, h.block_size, len(h.block_ids)) == \
                ("pre", 20, BS, 5)
            assert h.transport_address == p.address
            assert (await p.stats()).kv_blocks_used == 5  # pinned until released
            rest, dlast = await d.generate("r1", PROMPT + tuple(first), 9, handle=h)
            assert first + rest == whole
            assert dlast.num_cached_tokens == 20  # pulled, not computed
            ds = await d.stats()
            assert (ds.prefix_hit_tokens, ds.prefix_query_tokens) == (20, 24)
            await no_blocks_in_use(p, d)  # the decode worker released the handle
            assert d.server.importer.num_pulled == 1

            # the next turn goes to the decode worker: only its new blocks are pulled
            turn2 = PROMPT + tuple(first + rest) + (7, 8, 9)
            first2, last2 = await p.generate("r2", turn2, 4, prefill_only=True)
            assert last2.num_cached_tokens == 20  # the prefill worker's own cache
            rest2, dlast2 = await d.generate("r2", turn2 + tuple(first2), 3,
                                             handle=last2.kv_handle)
            whole2, _ = await agg.generate("a2", turn2, 4)
            assert first2 + rest2 == whole2
            assert dlast2.num_cached_tokens == (len(turn2) // BS) * BS
            await no_blocks_in_use(p, d)

    run(main())


def test_a_released_handle_or_a_dead_holder_means_a_local_prefill(tiny_folder):
    async def main():
        p_eng, d_eng = torch_pair(tiny_folder)
        agg_engine = build_torch_engine(str(tiny_folder), CFG).engine
        async with Worker(agg_engine, "agg", "aggregated") as agg, \
                Worker(d_eng, "dec", "decode") as d:
            whole, _ = await agg.generate("a", PROMPT, 6)
            other = tuple(reversed(PROMPT))
            whole_other, _ = await agg.generate("b", other, 6)
            async with Worker(p_eng, "pre", "prefill") as p:
                first, last = await p.generate("r1", PROMPT, 6, prefill_only=True)
                kv = worker_pb2_grpc.KvTransferStub(p.channel)
                rel = await kv.ReleaseHandle(worker_pb2.ReleaseHandleRequest(
                    handle_id=last.kv_handle.handle_id))
                assert rel.released
                await no_blocks_in_use(p)
                rest, dlast = await d.generate("r1", PROMPT + tuple(first), 5,
                                               handle=last.kv_handle)
                assert first + rest == whole and dlast.num_cached_tokens == 0
                assert d.server.importer.num_failed == 1
                first2, last2 = await p.generate("r2", other, 6, prefill_only=True)
            # the prefill worker is gone (stopped: its handles were released)
            rest2, _ = await d.generate("r2", other + tuple(first2), 5, handle=last2.kv_handle)
            assert first2 + rest2 == whole_other
            assert d.server.importer.num_failed == 2
            await no_blocks_in_use(d)

    run(main())


def test_an_unpulled_handle_is_released_after_its_ttl():
    async def main():
        eng = LLMEngine(MockerRunner(384, 512), CFG)
        async with Worker(eng, "pre", "prefill", kv_handle_ttl_s=0.2) as p:
            _, last = await p.generate("r", PROMPT, 4, prefill_only=True)
            assert len(last.kv_handle.block_ids) == 5
            assert (await p.stats()).kv_blocks_used == 5
            await asyncio.sleep(0.5)
            await no_blocks_in_use(p)
            kv = worker_pb2_grpc.KvTransferStub(p.channel)
            rel = await kv.ReleaseHandle(worker_pb2.ReleaseHandleRequest(
                handle_id=last.kv_handle.handle_id))
            assert not rel.released

    run(main())


def test_bad_disaggregation_requests_are_invalid_argument():
    async def main():
        eng = LLMEngine(MockerRunner(384, 512), CFG)
        other = LLMEngine(MockerRunner(384, 512), EngineConfig(block_size=8, num_blocks=64))
        async with Worker(eng, "pre", "prefill") as p, Worker(other, "dec8", "decode") as d:
            _, last = await p.generate("r", PROMPT, 4, prefill_only=True)
            cases = [
                (d, PROMPT, last.kv_handle, "same --block-size"),
                (p, (1,) + PROMPT[1:], last.kv_handle, "not those of this prompt"),
            ]
            for w, prompt, handle, message in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await w.generate("bad", prompt, 3, handle=handle)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await p.generate("both", PROMPT, 3, prefill_only=True, handle=last.kv_handle)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "both prefill_only and remote_prefill" in err.value.details()

    run(main())


def test_cancelling_during_prefill_or_decode_leaves_no_block_in_use():
    slow = TimingModel(speedup=0.05)  # tens of ms per pass
    async def main():
        p_eng = LLMEngine(MockerRunner(384, 512, timing=slow, clock=WallClock()), CFG)
        d_eng = LLMEngine(MockerRunner(384, 512, timing=slow, clock=WallClock()), CFG)
        async with Worker(p_eng, "pre", "prefill") as p, Worker(d_eng, "dec", "decode") as d:
            # cancelled during prefill: nothing pinned
            call = asyncio.ensure_future(p.generate("c1", PROMPT * 4, 4, prefill_only=True))
            await asyncio.sleep(0.05)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            first, last = await p.generate("c2", PROMPT, 4, prefill_only=True)
            call = asyncio.ensure_future(d.generate("c2", PROMPT + tuple(first), 50,
                                                    handle=last.kv_handle))
            await asyncio.sleep(0.3)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            await no_blocks_in_use(p, d)

    run(main())
