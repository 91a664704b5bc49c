"""The frontend's two-hop path against real worker gRPC servers (tiny random Llama on the torch
runner, mocker engines for timing), publishing KV events and load to a real nats-server, routed
by a RoutingService in ``kv`` mode:

- workers register with their roles; an aggregated deployment never takes the two-hop path;
- remote prefill: greedy tokens equal an aggregated worker's, usage counts the prompt, the
  decision is counted on /metrics, nothing stays pinned or in use, no in-flight entry is left;
- conditional disaggregation: a short prompt, and the next turn of a conversation on the
  decode worker that holds the first, are prefilled locally;
- one token (max_tokens 1, a stop string on the first token): the frontend releases the handle;
- the prefill worker gone: the request completes on the decode worker (local prefill);
- cancel while queued on the prefill worker, after it returned a handle, during decode: no
  block stays in use anywhere.
"""

from __future__ import annotations

import asyncio
import time
from typing import Self

import grpc
import pytest

from ferry.v1 import worker_pb2, worker_pb2_grpc
from kvcache.hashing import BlockHashConfig, hash_blocks
from orchestrator.frontend import Frontend, FrontendConfig, GenerateInput
from orchestrator.frontend.disagg import TurnPlanner
from orchestrator.frontend.types import DisaggPlan
from orchestrator.routing import RoutingConfig, RoutingService
from router.disagg import PREFILL_KEY_SUFFIX, DisaggConfig, PoolRole
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder
from tests.helpers.waiting import wait_until
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.factory import build_torch_engine
from workers.mocker.clock import WallClock
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel
from workers.server.worker import WorkerConfig, WorkerServer
from workers.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(180)

BS = 4
CFG = EngineConfig(block_size=BS, num_blocks=128)
HASH = BlockHashConfig(block_size=BS, seed=CFG.hash_seed)
MODEL = "tiny"
REMOTE = DisaggConfig(max_local_prefill_tokens=0)  # every prompt to a prefill worker
PROMPT = tuple(20 + (i * 37) % 300 for i in range(23))  # 5 full blocks and 3 tokens


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny"))



class Deployment:
    """In-process workers with roles behind their gRPC servers, and one frontend routing them.
    ``timing``: mocker engines with this timing model (or one per worker id) instead of the
    tiny torch model."""

    def __init__(self, folder, nats_url: str, roles: dict[str, str], *,
                 disagg: DisaggConfig = REMOTE,
                 timing: TimingModel | dict[str, TimingModel] | None = None,
                 engines: dict[str, EngineConfig] | None = None) -> None:
        self.folder = folder
        self.engines = engines or {}
        self.roles = roles
        self.timing = timing
        self.tokenizer = Tokenizer.from_hf_folder(folder)
        self.servers: dict[str, WorkerServer] = {}
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stopped: set[str] = set()
        self.service = RoutingService(RoutingConfig(hash_config=HASH, disagg=disagg), nats_url)
        self.frontend = Frontend(self.tokenizer, FrontendConfig(model_name=MODEL))
        self.service.attach(self.frontend)
        self.nats_url = nats_url
        self.route_ids: list[str] = []  # every request planned, by route id
        self.plans: list[DisaggPlan] = []  # and its plan
        plan = self.service.plan_disagg

        def planned(request, prefill_candidates):
            self.route_ids.append(request.request_id)
            self.plans.append(plan(request, prefill_candidates))
            return self.plans[-1]

        self.service.plan_disagg = planned

    def _engine(self, wid: str) -> LLMEngine:
        cfg = self.engines.get(wid, CFG)
        if self.timing is None:
            return build_torch_engine(str(self.folder), cfg).engine
        timing = self.timing.get(wid, TimingModel()) if isinstance(self.timing, dict) \
            else self.timing
        return LLMEngine(MockerRunner(self.tokenizer.vocab_size, 256, timing=timing,
                                      clock=WallClock()), cfg)

    async def __aenter__(self) -> Self:
        for wid, role in self.roles.items():
            server = WorkerServer(self._engine(wid), WorkerConfig(
                worker_id=wid, model=MODEL, role=role, nats_url=self.nats_url))
            self.servers[wid] = server
            address = await server.start()
            self.channels[wid] = grpc.aio.insecure_channel(address)
            await self.frontend.add_worker(wid, address)
        assert await self.service.start(timeout=5)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.frontend.close()
        await self.service.close()
        await asyncio.gather(*(c.close() for c in self.channels.values()))
        await asyncio.gather(*(s.stop(0.5) for w, s in self.servers.items()
                               if w not in self.stopped))

    async def stop_worker(self, wid: str) -> None:
        self.stopped.add(wid)
        await self.servers[wid].stop(0)

    def request(self, ids=PROMPT, max_tokens: int = 8, **kw) -> GenerateInput:
        return GenerateInput(prompt_token_ids=tuple(ids), max_tokens=max_tokens, temperature=0.0,
                             **{"ignore_eos": True, **kw})

    async def complete(self, ids=PROMPT, max_tokens: int = 8, **kw):
        done = await self.frontend.complete(self.request(ids, max_tokens, **kw))
        assert done.error is None, done.error
        return done

    async def stats(self, wid: str) -> worker_pb2.StatsResponse:
        stub = worker_pb2_grpc.WorkerStub(self.channels[wid])
        return await stub.Stats(worker_pb2.StatsRequest(), timeout=5)

    async def idle(self, timeout: float = 10.0) -> None:
        """No block in use or pinned on any live worker (integrity checked), no request in
        flight in the router or the frontend."""
        deadline = time.monotonic() + timeout
        for wid in self.servers:
            if wid in self.stopped:
                continue
            while True:
                s = await self.stats(wid)
                if (s.kv_blocks_used, s.num_running, s.num_waiting) == (0, 0, 0):
                    break
                assert time.monotonic() < deadline, f"{wid} still busy: {s}"
                await asyncio.sleep(0.02)
            assert s.integrity_ok, s.integrity_detail
        await self.frontend.disagg.close()
        assert self.frontend.metrics.in_flight._value.get() == 0
        assert not [r for r in self.route_ids if self.in_flight(r)]

    def decisions(self) -> dict[tuple[str, str], float]:
        out = {}
        for metric in self.frontend.metrics.registry.collect():
            if metric.name == "ferry_frontend_disagg_decisions":
                for s in metric.samples:
                    if s.name.endswith("_total") and s.value:
                        out[(s.labels["choice"], s.labels["reason"])] = s.value
        return out

    def released_by_frontend(self) -> float:
        return self.frontend.metrics.registry.get_sample_value(
            "ferry_frontend_disagg_handle_releases_total")

    def in_flight(self, route_id: str) -> bool:
        view = self.service.router.load_view
        return self.service.disagg.in_flight(route_id) or view.is_in_flight(route_id) \
            or view.is_in_flight(route_id + PREFILL_KEY_SUFFIX)


async def aggregated_tokens(folder, nats_url: str, prompts, max_tokens: int = 8):
    async with Deployment(folder, nats_url, {"ref-agg": "aggregated"}) as ref:
        assert not ref.frontend.disagg.active
        return [(await ref.complete(p, max_tokens)).token_ids for p in prompts]


# ------------------------------------------------------------------------------ roles


def test_workers_register_in_their_roles_pools(tiny_folder, nats_server):
    async def main():
        roles = {"roles-p": "prefill", "roles-d0": "decode", "roles-d1": "decode"}
        async with Deployment(tiny_folder, nats_server.url, roles,
                              timing=TimingModel(speedup=50.0)) as dep:
            d = dep.service.disagg
            assert d.pool(decode=False) == ("roles-p",)
            assert d.pool(decode=True) == ("roles-d0", "roles-d1")
            assert d.role("roles-p") is PoolRole.PREFILL
            assert dep.frontend.disagg.active
            assert dep.frontend.disagg.prefill_ids == frozenset({"roles-p"})
            await dep.frontend.remove_worker("roles-p")
            assert d.pool(decode=False) == () and "roles-p" not in dep.service.router.workers
            assert dep.frontend.disagg.active  # decode workers are still there
            # no prefill worker: local on a decode worker, counted as such
            done = await dep.complete(max_tokens=3)
            assert len(done.token_ids) == 3
            assert dep.decisions() == {("local", "no_prefill_worker"): 1}
            await dep.idle()

    run(main())


# ------------------------------------------------------------------------------ failures


def test_a_dead_prefill_worker_means_a_local_prefill_on_the_decode_worker(tiny_folder,
                                                                          nats_server):
    async def main():
        (want,) = await aggregated_tokens(tiny_folder, nats_server.url, [PROMPT])
        roles = {"dead-p": "prefill", "dead-d": "decode"}
        async with Deployment(tiny_folder, nats_server.url, roles) as dep:
            await dep.stop_worker("dead-p")
            done = await dep.complete()
            assert done.token_ids == want
            assert done.usage.prompt_tokens == len(PROMPT)
            assert dep.decisions() == {("remote", "long_prefill"): 1,
                                       ("local", "prefill_failed"): 1}
            assert dep.service.stats().disagg_decisions["prefill_failed"] == 1
            await dep.idle()

    run(main())


# ------------------------------------------------------------------------------ remote prefill


def test_remote_prefill_gives_the_aggregated_tokens_and_leaves_nothing_pinned(tiny_folder,
                                                                              nats_server):
    prompts = [PROMPT, PROMPT[:9] + (7, 8, 9, 10, 11, 12, 13, 14, 15, 16)]

    async def main():
        want = await aggregated_tokens(tiny_folder, nats_server.url, prompts)
        roles = {"rem-p": "prefill", "rem-d": "decode"}
        async with Deployment(tiny_folder, nats_server.url, roles) as dep:
            first = await dep.complete(prompts[0])
            assert first.token_ids == want[0]
            assert (first.usage.prompt_tokens, first.usage.completion_tokens,
                    first.usage.cached_tokens) == (23, 8, 0)
            ds = await dep.stats("rem-d")  # the decode worker pulled the 5 full blocks
            assert (ds.prefix_hit_tokens, ds.prefix_query_tokens) == (20, 24)
            second = await dep.complete(prompts[1])  # shares 2 blocks with the first on P
            assert second.token_ids == want[1]
            assert second.usage.cached_tokens == 8  # what the prefill worker found cached
            assert dep.decisions() == {("remote", "long_prefill"): 2}
            assert dep.released_by_frontend() == 0  # the decode worker released both
            await dep.idle()

    run(main())


def test_a_short_prompt_and_the_next_turn_are_prefilled_on_the_decode_worker(tiny_folder,
                                                                           nats_server):
    turn1 = tuple(30 + (i * 53) % 250 for i in range(40))  # 10 full blocks

    async def main():
        roles = {"turn-p": "prefill", "turn-d0": "decode", "turn-d1": "decode"}
        async with Deployment(tiny_folder, nats_server.url, roles,
                              disagg=DisaggConfig(max_local_prefill_tokens=16)) as dep:
            await dep.complete(turn1[:12], max_tokens=2)  # 12 tokens <= 16: local
            assert dep.plans[-1].reason.value == "short_prefill"
            first = await dep.complete(turn1)  # 40 tokens, at most 8 cached anywhere: remote
            plan = dep.plans[-1]
            assert (plan.reason.value, plan.prefill_worker) == ("long_prefill", "turn-p")
            holder = plan.decode_worker
            other = "turn-d1" if holder == "turn-d0" else "turn-d0"
            hashes = hash_blocks(turn1, HASH)
            await wait_until(lambda: dep.service.router.index.overlap(hashes).get(holder) == 10,
                             what="the pulled blocks in the router's index")
            before = {w: await dep.stats(w) for w in (holder, other)}
            turn2 = turn1 + first.token_ids + (5, 6, 7)  # 51 tokens
            second = await dep.complete(turn2)
            plan = dep.plans[-1]
            assert (plan.decode_worker, plan.prefill_worker, plan.reason.value) == \
                (holder, None, "short_prefill")
            assert second.usage.cached_tokens >= 40
            after = {w: await dep.stats(w) for w in (holder, other)}
            assert after[holder].prefix_hit_tokens - before[holder].prefix_hit_tokens == \
                second.usage.cached_tokens  # it computed only the rest
            assert after[holder].prefix_query_tokens - before[holder].prefix_query_tokens == 51
            assert after[other].prefix_query_tokens == before[other].prefix_query_tokens
            assert dep.decisions() == {("local", "short_prefill"): 2,
                                       ("remote", "long_prefill"): 1}
            await dep.idle()

    run(main())


def test_a_one_token_request_ends_on_the_prefill_worker_and_the_frontend_releases(
        tiny_folder, nats_server):
    async def main():
        (want,) = await aggregated_tokens(tiny_folder, nats_server.url, [PROMPT])
        roles = {"one-p": "prefill", "one-d": "decode"}
        async with Deployment(tiny_folder, nats_server.url, roles) as dep:
            done = await dep.complete(max_tokens=1)
            assert (done.token_ids, done.finish_reason.value) == (want[:1], "length")
            stop = dep.tokenizer.decode(want[:1])
            assert stop.strip(), f"pick another prompt: the first token decodes to {stop!r}"
            done = await dep.complete(stop=(stop,))  # matched on the first token
            assert (done.token_ids, done.finish_reason.value, done.text) == \
                (want[:1], "stop", "")
            await dep.idle()
            assert dep.released_by_frontend() == 2
            assert (await dep.stats("one-d")).prefix_query_tokens == 0  # never called

    run(main())


# ------------------------------------------------------------------------------ cancel


SLOW_PREFILL = TimingModel(speedup=0.02)  # a prefill pass >= 840 ms
SLOW = TimingModel(speedup=0.05)  # a decode step >= 115 ms


async def start(dep: Deployment, max_tokens: int = 50):
    """A request's stream and a task reading it into ``chunks``."""
    chunks = []
    stream = await dep.frontend.generate(dep.request(max_tokens=max_tokens))

    async def read():
        async for chunk in stream:
            chunks.append(chunk)

    return stream, asyncio.create_task(read()), chunks


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancel_at_each_stage_leaves_no_block_in_use(tiny_folder, nats_server):
    async def main():
        roles = {"cx-p": "prefill", "cx-d": "decode"}
        one_seq = EngineConfig(block_size=BS, num_blocks=128, max_num_seqs=1)
        async with Deployment(tiny_folder, nats_server.url, roles,
                              timing={"cx-p": SLOW_PREFILL, "cx-d": SLOW},
                              engines={"cx-p": one_seq}) as dep:
            # queued on the prefill worker behind another request (one at a time there), then
            # that one while it prefills
            _, running, first = await start(dep)
            await asyncio.sleep(0.1)
            _, queued, _ = await start(dep)
            await asyncio.sleep(0.1)
            assert not first, "the first prefill ended early: the second one was not queued"
            await cancel(queued)
            await cancel(running)
            await dep.idle()
            assert (await dep.stats("cx-d")).prefix_query_tokens == 0

            # after the prefill worker returned a handle, before the decode worker is called
            stream = await dep.frontend.generate(dep.request(max_tokens=50))  # read here only
            await anext(stream)  # the first token (from the prefill worker)
            await stream.aclose()
            await dep.idle()
            assert dep.released_by_frontend() == 1
            assert (await dep.stats("cx-d")).prefix_query_tokens == 0

            # just after the first token: the decode worker pulls or prefills
            _, task, chunks = await start(dep)
            await wait_until(lambda: len(chunks) == 1, what="the first token")
            await cancel(task)
            await dep.idle()

            # during decode
            _, task, chunks = await start(dep)
            await wait_until(lambda: len(chunks) == 3, what="two chunks from the decode worker")
            await cancel(task)
            await dep.idle()
            assert dep.decisions() == {("remote", "long_prefill"): 5}
            assert dep.frontend.metrics.registry.get_sample_value(
                "ferry_frontend_requests_total", {"status": "cancelled"}) == 5

    run(main())



def test_a_frontend_without_a_router_plans_in_turn(tiny_folder):
    async def main():
        tokenizer = Tokenizer.from_hf_folder(tiny_folder)
        frontend = Frontend(tokenizer, FrontendConfig(model_name=MODEL))
        servers = {}
        try:
            for wid, role in (("tp-p0", "prefill"), ("tp-p1", "prefill"), ("tp-d0", "decode"),
                              ("tp-d1", "decode")):
                servers[wid] = WorkerServer(build_torch_engine(str(tiny_folder), CFG).engine,
                                            WorkerConfig(worker_id=wid, model=MODEL, role=role))
                await frontend.add_worker(wid, await servers[wid].start())
            frontend.disagg.planner = TurnPlanner(frontend.pick_worker,
                                                  DisaggConfig(max_local_prefill_tokens=12))
            for ids in (PROMPT[:12], PROMPT, PROMPT, PROMPT[:5]):
                done = await frontend.complete(GenerateInput(prompt_token_ids=ids, max_tokens=3,
                                                             ignore_eos=True))
                assert done.error is None and len(done.token_ids) == 3
            queried = {w: s.engine.kv.prefix_stats().queried_tokens for w, s in servers.items()}
            # decode workers in turn (d0 short, d1 long, d0 long, d1 short); prefill workers in
            # turn for the long ones
            assert queried == {"tp-p0": 23, "tp-p1": 23, "tp-d0": 12 + 24, "tp-d1": 24 + 5}
        finally:
            await frontend.close()
            await asyncio.gather(*(s.stop(0.5) for s in servers.values()))

    run(main())
