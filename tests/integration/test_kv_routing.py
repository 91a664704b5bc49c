"""Live KV-aware routing: mocker workers (in-process WorkerServers publishing KV events and load
to a real nats-server), Frontends routing through RoutingService, real gRPC throughout.

- a request sharing a long prefix with an earlier one goes to the worker holding it (cached
  tokens reported by the worker), through the ferry.v1 gRPC API; /metrics shows the rates;
- a dropped KV batch is repaired from JetStream (the index equals the worker's cache again),
  and one that the stream lost too resynchronises the worker;
- two replicas build the same index and share their in-flight requests;
- a restarted replica rebuilds its index from JetStream within seconds and routes the same;
- a worker with another block size or hash seed is refused with the fix in the message,
  also on ``ferry serve``'s path;
- the online replay of a trace slice against a live mocker cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Self

import grpc
import pytest

from ferry.v1 import client_pb2, client_pb2_grpc, common_pb2
from kvcache.hashing import BlockHashConfig, hash_blocks
from orchestrator.frontend import Frontend, FrontendConfig, FrontendServer, GenerateInput
from orchestrator.routing import RoutingConfig, RoutingService
from orchestrator.serve import ServeConfig, serving_frontend
from orchestrator.worker_actor import WorkerEndpoint
from router.types import RouterMode
from tests.helpers.fake_worker import write_tokenizer_folder
from tests.helpers.waiting import wait_until
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.mocker.clock import WallClock
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel
from workers.server.worker import WorkerConfig, WorkerServer
from workers.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(120)

MODEL = "mock-model"
VOCAB = 384
BS = 4
HASH = BlockHashConfig(block_size=BS, seed=0)
FAST = TimingModel(speedup=20.0)


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A folder named like the mock model, holding its tokenizer (what serve resolves)."""
    return write_tokenizer_folder(tmp_path_factory.mktemp("tok") / MODEL)


@pytest.fixture(scope="module")
def tokenizer(model_folder) -> Tokenizer:
    return Tokenizer.from_hf_folder(model_folder)



def prompt(seed: int, n: int) -> tuple[int, ...]:
    """n distinct-looking token ids in [10, VOCAB) (no special tokens)."""
    return tuple(10 + (seed * 7919 + i * 104729 + (i * i) % 97) % (VOCAB - 10) for i in range(n))


class Cluster:
    """In-process mocker workers behind their gRPC servers, publishing to NATS."""

    def __init__(self, nats_url: str, ids: list[str], *, engine: EngineConfig | None = None,
                 timing: TimingModel = FAST) -> None:
        self.nats_url = nats_url
        self.ids = ids
        self.engine_config = engine or EngineConfig(block_size=BS, num_blocks=256)
        self.timing = timing
        self.servers: dict[str, WorkerServer] = {}
        self.addresses: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        for wid in self.ids:
            engine = LLMEngine(MockerRunner(VOCAB, 2048, timing=self.timing, clock=WallClock()),
                               self.engine_config)
            server = WorkerServer(engine, WorkerConfig(worker_id=wid, model=MODEL,
                                                       nats_url=self.nats_url))
            self.addresses[wid] = await server.start()
            self.servers[wid] = server
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(s.stop(0.5) for s in self.servers.values()))

    def cached_hashes(self, wid: str) -> set[int]:
        """Every block hash in the worker's prefix cache now."""
        pool = self.servers[wid].engine.kv.pool
        return {h for i in range(pool.num_blocks) if (h := pool.block_hash(i)) is not None}

    def hit_tokens(self) -> dict[str, int]:
        return {w: s.engine.kv.prefix_stats().hit_tokens for w, s in self.servers.items()}


class Replica:
    """One frontend with its own RoutingService."""

    def __init__(self, cluster: Cluster, tokenizer: Tokenizer, *,
                 config: RoutingConfig | None = None) -> None:
        self.cluster = cluster
        self.service = RoutingService(config or RoutingConfig(hash_config=HASH),
                                      cluster.nats_url)
        self.frontend = Frontend(tokenizer, FrontendConfig(model_name=MODEL))
        self.service.attach(self.frontend)
        self.started_at = 0.0

    async def __aenter__(self) -> Self:
        self.started_at = time.monotonic()
        for wid, address in self.cluster.addresses.items():
            await self.frontend.add_worker(wid, address)
        assert await self.service.start(timeout=5)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.frontend.close()
        await self.service.close()

    async def complete(self, ids: tuple[int, ...], max_tokens: int = 3):
        done = await self.frontend.complete(GenerateInput(prompt_token_ids=ids,
                                                          max_tokens=max_tokens,
                                                          ignore_eos=True))
        assert done.error is None, done.error
        return done

    def index_blocks(self, wid: str) -> set[int]:
        return {h for ev in self.service.router.snapshot(wid).stored for h in ev.block_hashes}

    def overlap(self, ids: tuple[int, ...]) -> dict[str, int]:
        return dict(self.service.router.index.overlap(hash_blocks(ids, HASH)).scores)

    async def settled(self, cluster: Cluster, timeout: float = 10.0) -> None:
        """The index equals every worker's cache (all events applied)."""
        await wait_until(lambda: all(self.index_blocks(w) == cluster.cached_hashes(w)
                                     for w in cluster.ids), timeout, "index == worker caches")


# ------------------------------------------------------------------------------ routing


def test_a_shared_prefix_goes_to_the_worker_holding_it_over_grpc(nats_server, tokenizer):
    ids = ["route-a", "route-b", "route-c"]
    prefixes = [prompt(s, 64) for s in (1, 2, 3)]  # 16 full blocks each

    async def main():
        async with Cluster(nats_server.url, ids) as cluster, \
                Replica(cluster, tokenizer) as replica:
            server = FrontendServer(replica.frontend, http_port=None, kserve_port=None,
                                    stats_interval_s=None)
            ports = await server.start()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}")
            stub = client_pb2_grpc.FerryStub(channel)

            async def generate(ids_: tuple[int, ...]) -> client_pb2.GenerateResponse:
                request = client_pb2.GenerateRequest(
                    model=MODEL, token_ids=client_pb2.TokenIds(ids=list(ids_)),
                    sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True))
                chunks = [c async for c in stub.Generate(request)]
                assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH, chunks[-1]
                return chunks[-1]

            try:
                for p in prefixes:  # one first request per prefix
                    await generate(p + prompt(100, 5))
                await replica.settled(cluster)
                holders = []
                for p in prefixes:
                    hashes = set(hash_blocks(p, HASH))
                    held = [w for w in ids if hashes <= cluster.cached_hashes(w)]
                    assert len(held) == 1, held
                    holders.append(held[0])
                    assert replica.overlap(p + (1, 2)) == {held[0]: 16}
                before = cluster.hit_tokens()
                for p, holder in zip(prefixes, holders, strict=True):
                    last = await generate(p + prompt(200, 7))  # 71 tokens: 64 of them cached
                    assert last.usage.cached_tokens == 64
                    hits = cluster.hit_tokens()
                    assert hits[holder] - before[holder] == 64  # the exact worker
                    assert all(hits[w] == before[w] for w in ids if w != holder)
                    before = hits
                stats = replica.service.stats()
                assert (stats.router.requests, stats.router.prompt_blocks) == (6, 3 * 17 + 3 * 17)
                assert stats.router.hit_blocks == 3 * 16
                assert stats.router.achievable_hit_blocks == 3 * 16
                assert stats.fallbacks == 0 and stats.gaps == 0
                metrics = replica.frontend.metrics.render().decode()
                want = 48 / 102
                assert f'ferry_router_prefix_hit_rate{{mode="kv"}} {want}' in metrics
                assert f'ferry_router_achievable_prefix_hit_rate{{mode="kv"}} {want}' in metrics
                assert "ferry_router_requests_total 6.0" in metrics
            finally:
                await channel.close()
                await server.stop()

    run(main())


# ------------------------------------------------------------------------------ gap repair


def test_a_dropped_batch_is_replayed_and_the_index_matches_again(nats_server, tokenizer):
    async def main():
        async with Cluster(nats_server.url, ["gap-w"]) as cluster, \
                Replica(cluster, tokenizer) as replica:
            feed = replica.service.feed
            dropped: list[int] = []
            live = feed.on_kv

            def drop_seq_1(worker_id, batch):  # every delivery of it (the live one may come twice)
                if batch.seq == 1:
                    dropped.append(batch.seq)
                    return
                live(worker_id, batch)

            feed.on_kv = drop_seq_1
            for s in range(4):
                await replica.complete(prompt(10 + s, 24))
            await replica.settled(cluster)
            assert set(dropped) == {1}
            assert replica.index_blocks("gap-w") == cluster.cached_hashes("gap-w")
            assert len(replica.index_blocks("gap-w")) == 4 * 6
            stats = replica.service.stats()
            assert (stats.gaps, stats.repairs, stats.resyncs) == (1, 1, 0)
            assert feed.repairing == frozenset()

    run(main())


def test_a_batch_the_stream_lost_too_resynchronises_the_worker(nats_server, tokenizer):
    async def main():
        async with Cluster(nats_server.url, ["lost-w"]) as cluster, \
                Replica(cluster, tokenizer) as replica:
            feed = replica.service.feed
            js = (await replica.service.peers.link.wait_connected(5)).jetstream()
            live = feed.on_kv
            gone: list[int] = []

            def lose_seq_1(worker_id, batch):  # every delivery of it
                if batch.seq == 1:
                    gone.append(batch.seq)
                    return
                live(worker_id, batch)

            feed.on_kv = lose_seq_1
            await replica.complete(prompt(20, 24))
            await replica.complete(prompt(21, 24))
            await wait_until(lambda: 1 in gone, what="batch 1 seen")
            last = await js.get_last_msg("FERRY_KV", "ferry.kv.lost-w")
            await js.delete_msg("FERRY_KV", last.seq)  # batch 1: the stream loses it too
            await replica.complete(prompt(22, 24))
            await wait_until(lambda: replica.service.stats().repairs == 1, what="repair")
            stats = replica.service.stats()
            assert (stats.gaps, stats.repairs, stats.resyncs) == (1, 1, 1)
            # the index went on from the batch after the hole: the third prompt's blocks only
            assert replica.index_blocks("lost-w") == set(hash_blocks(prompt(22, 24), HASH))
            assert replica.index_blocks("lost-w") <= cluster.cached_hashes("lost-w")

    run(main())


# ------------------------------------------------------------------------------ replicas


def test_two_replicas_agree_on_the_index_and_share_in_flight_load(nats_server, tokenizer):
    ids = ["pair-a", "pair-b", "pair-c"]
    slow = TimingModel(speedup=1.0)  # about 6 ms a decode step
    grace = RoutingConfig(hash_config=HASH, load_grace_s=60.0)  # only `finished` ends entries

    async def main():
        async with Cluster(nats_server.url, ids, timing=slow) as cluster, \
                Replica(cluster, tokenizer, config=grace) as one, \
                Replica(cluster, tokenizer, config=grace) as two:
            prompts = [prompt(30 + s, 40) for s in range(6)]
            for i, p in enumerate(prompts):
                await (one if i % 2 else two).complete(p)
            await one.settled(cluster)
            await two.settled(cluster)
            for w in ids:
                assert one.index_blocks(w) == two.index_blocks(w)
            for p in prompts:
                probe = p + prompt(99, 3)
                assert one.overlap(probe) == two.overlap(probe)
                assert sum(one.overlap(probe).values()) >= 10

            # A long request routed by `one` counts on `two` while it runs.
            updates = two.service.stats().peer_updates
            long = asyncio.create_task(one.complete(prompt(50, 40), max_tokens=150))
            await wait_until(lambda: two.service.stats().peer_updates == updates + 2,
                             what="routed + prefill_done seen by the other replica")

            def busy_workers() -> list[str]:
                return [ld.worker_id for ld in two.service.router.load_view.loads()
                        if ld.decode_blocks > 0]

            # Load reports of the earlier requests may still be on their way.
            await wait_until(lambda: len(busy_workers()) == 1, what="one busy worker")
            busy = busy_workers()
            loads = {ld.worker_id: ld for ld in two.service.router.load_view.loads()}
            # ceil(40 / 4) from the shared in-flight entry; more once a load report shows
            # the long request's decoded tokens too (a slow machine gets there first).
            assert loads[busy[0]].decode_blocks >= 10
            # A fresh prompt routed by `two` avoids the worker `one` is using.
            await two.complete(prompt(51, 40))
            hits = {w: cluster.servers[w].engine.stats() for w in ids}
            assert hits[busy[0]].num_running == 1  # only the long request there
            await long
            await wait_until(lambda: two.service.stats().peer_updates == updates + 3,
                             what="finished seen by the other replica")
            await wait_until(lambda: not busy_workers(), what="no busy worker once the last "
                             "load report shows the long request done")

    run(main())


def test_a_restarted_replica_rebuilds_its_index_from_jetstream_and_routes_the_same(
        nats_server, tokenizer):
    ids = ["again-a", "again-b"]
    prefixes = [prompt(60 + s, 48) for s in range(4)]

    async def main():
        async with Cluster(nats_server.url, ids) as cluster:
            async with Replica(cluster, tokenizer) as first:
                for p in prefixes:
                    await first.complete(p + (5,))
                await first.settled(cluster)
                blocks = {w: first.index_blocks(w) for w in ids}
                answers = [first.overlap(p + (7, 8)) for p in prefixes]
            t0 = time.monotonic()
            async with Replica(cluster, tokenizer) as second:
                assert await second.service.catch_up(timeout=5)
                rebuilt_s = time.monotonic() - t0
                assert rebuilt_s < 5, rebuilt_s
                assert {w: second.index_blocks(w) for w in ids} == blocks
                assert [second.overlap(p + (7, 8)) for p in prefixes] == answers
                for p, answer in zip(prefixes, answers, strict=True):
                    (holder,) = answer
                    before = cluster.hit_tokens()
                    done = await second.complete(p + prompt(300, 6))
                    assert done.usage.cached_tokens == 48
                    assert cluster.hit_tokens()[holder] - before[holder] == 48

    run(main())


# ------------------------------------------------------------------------------ registration


@pytest.mark.parametrize(("engine", "message"), [
    (EngineConfig(block_size=BS, num_blocks=64, hash_seed=7),
     ("worker 'odd-seed' uses hash seed 7 but this router uses 0; start both with the same "
     "--hash-seed")),
    (EngineConfig(block_size=8, num_blocks=64),
     ("worker 'odd-size' uses block_size=8 but this router uses block_size=4; start both with "
     "the same --block-size")),
])
def test_a_worker_with_another_hash_layout_is_refused(nats_server, tokenizer, model_folder, engine,
                                                     message):
    wid = "odd-seed" if engine.hash_seed else "odd-size"

    async def main():
        async with Cluster(nats_server.url, [wid], engine=engine) as cluster:
            service = RoutingService(RoutingConfig(hash_config=HASH), nats_url=nats_server.url)
            frontend = Frontend(tokenizer, FrontendConfig(model_name=MODEL))
            service.attach(frontend)
            try:
                with pytest.raises(ValueError) as err:
                    await frontend.add_worker(wid, cluster.addresses[wid])
                assert str(err.value) == message
                assert len(frontend.pool) == 0 and service.router.workers == ()
            finally:
                await frontend.close()
                await service.close()
            # ferry serve's path: the same refusal stops the start
            cfg = ServeConfig(model=str(model_folder), runner="mocker",
                              engine=EngineConfig(block_size=BS, num_blocks=64))
            endpoint = WorkerEndpoint(wid, cluster.addresses[wid], 0, engine.block_size,
                                      engine.hash_seed, 64, 2048)
            with pytest.raises(ValueError) as err:
                async with serving_frontend(cfg, tokenizer, [endpoint], nats_server.url):
                    pass
            assert str(err.value) == message

    run(main())


def test_modes_without_events_open_no_nats_connection(tokenizer):
    for mode in (RouterMode.ROUND_ROBIN, RouterMode.RANDOM):
        service = RoutingService(RoutingConfig(mode=mode, hash_config=HASH))
        assert service.feed is None and service.peers is None
    with pytest.raises(ValueError, match="reads events from NATS: give nats_url"):
        RoutingService(RoutingConfig(mode=RouterMode.KV))


# ------------------------------------------------------------------------------ serve config


def test_serve_defaults_to_kv_and_takes_every_router_mode():
    assert ServeConfig().router == "kv"
    for mode in RouterMode:
        assert ServeConfig(router=mode.value).router == mode.value
    with pytest.raises(ValueError, match=r"--router must be one of \['kv', 'approx', "):
        ServeConfig(router="nearest")


with contextlib.suppress(ImportError):  # keep flake8-style tools quiet about json
    json.dumps({})
