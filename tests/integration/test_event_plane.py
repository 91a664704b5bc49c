"""The NATS event plane against a real nats-server: NatsServer's lifecycle, EventPublisher
(worker side) and EventSubscriber (router side), including a late subscriber, gap replay, and
a NATS server that comes up late or restarts."""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict

import nats
import pytest

from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from kvcache.wire import LoadReport
from orchestrator.event_subscriber import EventSubscriber
from orchestrator.nats_server import NatsServer, NatsServerError
from tests.helpers.waiting import wait_until
from tests.integration.conftest import child_nats_pids, pid_alive
from workers.server.event_publisher import EventPublisher
from workers.server.nats_link import Backoff, ensure_kv_stream

FAST = Backoff(initial=0.02, maximum=0.2)


def run(coroutine, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def batch(seq: int, salt: int = 0) -> KvEventBatch:
    """A distinct batch per (seq, salt), with 64-bit hashes and a None parent."""
    first = (2**64 - 1 - 1000 * salt - 10 * seq) & (2**64 - 1)
    events: tuple = (BlockStored(block_hashes=(first, first - 1), parent_hash=None),)
    if seq % 2:
        events += (BlockStored(block_hashes=(7,), parent_hash=first - 1), BlockRemoved((3,)))
    if seq % 5 == 4:
        events += (AllBlocksCleared(),)
    return KvEventBatch(seq=seq, timestamp=100.0 + seq, events=events)


class Collector:
    def __init__(self) -> None:
        self.kv: dict[str, list[KvEventBatch]] = defaultdict(list)
        self.loads: list[LoadReport] = []

    def on_kv(self, worker_id: str, kv_batch: KvEventBatch) -> None:
        self.kv[worker_id].append(kv_batch)

    def on_load(self, report: LoadReport) -> None:
        self.loads.append(report)



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- NatsServer


def test_server_runs_until_stop_and_leaves_nothing_behind():
    before = child_nats_pids()
    with NatsServer() as server:
        pid, folder = server.pid, server.store_dir.parent
        assert pid_alive(pid) and folder.is_dir()
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert child_nats_pids() == before | {pid}
        with socket.create_connection(("127.0.0.1", server.port), timeout=1) as sock:
            assert sock.recv(5) == b"INFO "
    assert not pid_alive(pid) and not folder.exists()
    assert server.pid is None and child_nats_pids() == before
    server.stop()  # idempotent


def test_an_exception_inside_with_still_stops_the_server():
    with pytest.raises(KeyError), NatsServer() as server:
        pid = server.pid
        raise KeyError("boom")
    assert not pid_alive(pid)


def test_a_server_that_cannot_start_reports_its_log_and_leaves_no_process(nats_server):
    before = child_nats_pids()
    busy = NatsServer(port=nats_server.port)
    with pytest.raises(NatsServerError, match="(?s)exited with code 1 .*address already in use"):
        busy.start()
    assert busy.pid is None and child_nats_pids() == before
    with pytest.raises(ValueError, match="port must be in 1..65535"):
        NatsServer(port=70000)


# ---------------------------------------------------------------------------- event plane


def test_stored_events_and_load_arrive_after_a_publish(nats_server):
    report = LoadReport("arrive-0", 5.0, waiting=1, running=2, kv_blocks_used=3,
                        kv_blocks_total=8, active_prefill_tokens=40, active_decode_blocks=2)  # fmt: skip

    async def scenario():
        got = Collector()
        subscriber = EventSubscriber(nats_server.url, got.on_kv, got.on_load, backoff=FAST)
        publisher = EventPublisher(nats_server.url, "arrive-0", backoff=FAST)
        try:
            assert await subscriber.start(timeout=5)
            assert await publisher.connect(timeout=5)
            await publisher.publish_kv(batch(0))
            await publisher.publish_kv(batch(1))
            await publisher.publish_load(report)
            await wait_until(lambda: len(got.kv["arrive-0"]) == 2 and got.loads)
            assert got.kv["arrive-0"] == [batch(0), batch(1)]
            assert got.kv["arrive-0"][0].events[0].parent_hash is None
            assert got.kv["arrive-0"][0].events[0].block_hashes[0] == 2**64 - 1
            assert got.loads == [report]
            stats = publisher.stats()
            assert (stats.connected, stats.published_kv, stats.pending_kv, stats.dropped_kv) == (
                True, 2, 0, 0,
            )  # fmt: skip
        finally:
            await publisher.close()
            await subscriber.close()

    run(scenario())


def test_two_workers_keep_separate_sequence_numbers(nats_server):
    async def scenario():
        got = Collector()
        subscriber = EventSubscriber(nats_server.url, got.on_kv, got.on_load, backoff=FAST)
        a = EventPublisher(nats_server.url, "two-a", backoff=FAST)
        b = EventPublisher(nats_server.url, "two-b", backoff=FAST)
        try:
            assert await subscriber.start(timeout=5)
            assert await a.connect(timeout=5) and await b.connect(timeout=5)
            for seq in range(3):
                await a.publish_kv(batch(seq, salt=1))
                if seq < 2:
                    await b.publish_kv(batch(seq, salt=2))
            await wait_until(lambda: len(got.kv["two-a"]) == 3 and len(got.kv["two-b"]) == 2)
            assert got.kv["two-a"] == [batch(0, 1), batch(1, 1), batch(2, 1)]
            assert got.kv["two-b"] == [batch(0, 2), batch(1, 2)]
            assert await subscriber.replay("two-b", 0) == [batch(0, 2), batch(1, 2)]
        finally:
            await a.close()
            await b.close()
            await subscriber.close()

    run(scenario())


def test_a_late_subscriber_replays_every_earlier_batch_in_order(nats_server):
    sent = [batch(seq, salt=3) for seq in range(20)]

    async def scenario():
        publisher = EventPublisher(nats_server.url, "late-sub", backoff=FAST)
        assert await publisher.connect(timeout=5)
        for kv_batch in sent:
            await publisher.publish_kv(kv_batch)
        assert await publisher.flush(timeout=5)
        assert publisher.stats().published_kv == 20
        await publisher.close()

        got = Collector()
        subscriber = EventSubscriber(nats_server.url, got.on_kv, got.on_load, backoff=FAST)
        try:
            assert await subscriber.start(timeout=5)
            await wait_until(lambda: len(got.kv["late-sub"]) == 20)
            await asyncio.sleep(0.1)  # nothing more, nothing twice
            assert got.kv["late-sub"] == sent
        finally:
            await subscriber.close()

    run(scenario())


def test_replay_returns_exactly_the_batches_from_seq(nats_server):
    sent = [batch(seq, salt=4) for seq in range(6)]

    async def scenario():
        publisher = EventPublisher(nats_server.url, "replay-0", backoff=FAST)
        subscriber = EventSubscriber(nats_server.url, lambda w, b: None, lambda r: None)
        try:
            assert await publisher.connect(timeout=5)
            for kv_batch in sent:
                await publisher.publish_kv(kv_batch)
            assert await publisher.flush(timeout=5)
            assert await subscriber.start(timeout=5)
            assert await subscriber.replay("replay-0", 3) == sent[3:]
            assert await subscriber.replay("replay-0", 0) == sent
            assert await subscriber.replay("replay-0", 5) == sent[5:]
            assert await subscriber.replay("replay-0", 6) == []
            assert await subscriber.replay("nobody", 0) == []
            with pytest.raises(ValueError, match="from_seq must be >= 0"):
                await subscriber.replay("replay-0", -1)
            with pytest.raises(ValueError, match="one NATS subject token"):
                await subscriber.replay("bad.id", 0)
        finally:
            await publisher.close()
            await subscriber.close()

    run(scenario())


def test_publisher_survives_a_server_that_is_not_up_yet():
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    report = LoadReport("early-0", 1.0, waiting=0, running=1, kv_blocks_used=1, kv_blocks_total=4)
    sent = [batch(seq, salt=5) for seq in range(3)]

    async def scenario():
        publisher = EventPublisher(url, "early-0", backoff=FAST)
        server = NatsServer(port=port)
        try:
            assert await publisher.connect(timeout=0.2) is False
            for kv_batch in sent:
                await publisher.publish_kv(kv_batch)  # the worker keeps serving: queued, no error
            await publisher.publish_load(report)
            await asyncio.sleep(0.3)  # a few failed attempts
            stats = publisher.stats()
            assert (stats.connected, stats.pending_kv, stats.published_kv) == (False, 3, 0)

            await asyncio.to_thread(server.start)
            assert await publisher.flush(timeout=5)
            assert publisher.stats().published_kv == 3
            got = Collector()
            subscriber = EventSubscriber(url, got.on_kv, got.on_load)
            assert await subscriber.start(timeout=5)
            await wait_until(lambda: len(got.kv["early-0"]) == 3)
            assert got.kv["early-0"] == sent
            await subscriber.close()
        finally:
            await publisher.close(flush_timeout=0)
            server.stop()

    run(scenario())


def test_publisher_and_subscriber_carry_on_after_the_server_restarts():
    sent = [batch(seq, salt=6) for seq in range(3)]

    async def scenario():
        server = NatsServer().start()
        port = server.port
        got = Collector()
        publisher = EventPublisher(server.url, "restart-0", backoff=FAST)
        subscriber = EventSubscriber(server.url, got.on_kv, got.on_load, backoff=FAST)
        try:
            assert await subscriber.start(timeout=5)
            assert await publisher.connect(timeout=5)
            await publisher.publish_kv(sent[0])
            await wait_until(lambda: len(got.kv["restart-0"]) == 1)

            await asyncio.to_thread(server.stop)  # the store goes with it
            await publisher.publish_kv(sent[1])
            await publisher.publish_kv(sent[2])
            server = NatsServer(port=port)
            await asyncio.to_thread(server.start)

            assert await publisher.flush(timeout=5)
            # the subscriber sees a recreated stream and reads it from its start
            await wait_until(lambda: len(got.kv["restart-0"]) == 3)
            assert got.kv["restart-0"] == sent
            assert await subscriber.replay("restart-0", 0) == sent[1:]
        finally:
            await publisher.close(flush_timeout=0)
            await subscriber.close()
            server.stop()

    run(scenario())


def test_kv_stream_creation_is_idempotent_and_keeps_other_limits():
    async def scenario(url: str):
        client = await nats.connect(url)
        js = client.jetstream()
        try:
            await ensure_kv_stream(client)
            await ensure_kv_stream(client)  # again: no error
            assert (await js.stream_info("FERRY_KV")).config.max_age == 3600
            await js.delete_stream("FERRY_KV")
            await js.add_stream(name="FERRY_KV", subjects=["ferry.kv.>"], max_age=60)
            await ensure_kv_stream(client)  # an operator's limits are kept
            assert (await js.stream_info("FERRY_KV")).config.max_age == 60
            await js.delete_stream("FERRY_KV")
            await js.add_stream(name="FERRY_KV", subjects=["other.>"])
            with pytest.raises(RuntimeError, match=r"exists with subjects \['other.>'\]"):
                await ensure_kv_stream(client)
        finally:
            await client.close()

    with NatsServer() as server:
        run(scenario(server.url))


def test_publisher_recreates_a_deleted_stream():
    async def scenario(url: str):
        publisher = EventPublisher(url, "gone-0", backoff=FAST)
        client = await nats.connect(url)
        js = client.jetstream()
        try:
            assert await publisher.connect(timeout=5)
            await publisher.publish_kv(batch(0, salt=7))
            assert await publisher.flush(timeout=5)
            await js.delete_stream("FERRY_KV")
            await publisher.publish_kv(batch(1, salt=7))
            assert await publisher.flush(timeout=5)
            assert (await js.stream_info("FERRY_KV")).state.messages == 1
            got = Collector()
            subscriber = EventSubscriber(url, got.on_kv, got.on_load)
            assert await subscriber.start(timeout=5)
            assert await subscriber.replay("gone-0", 0) == [batch(1, salt=7)]
            await subscriber.close()
        finally:
            await publisher.close(flush_timeout=0)
            await client.close()

    with NatsServer() as server:
        run(scenario(server.url))


def test_publisher_misuse_is_refused():
    with pytest.raises(ValueError, match="one NATS subject token"):
        EventPublisher("nats://127.0.0.1:1", "decode.0")
    publisher = EventPublisher("nats://127.0.0.1:1", "decode-0")

    async def scenario():
        with pytest.raises(RuntimeError, match="call `await connect\\(\\)` before publishing"):
            await publisher.publish_kv(batch(0))
        await publisher.connect()
        with pytest.raises(ValueError, match="worker_id is 'other' but this publisher is"):
            await publisher.publish_load(LoadReport("other", 0.0, 0, 0, 0, 1))
        with pytest.raises(ValueError, match="block_hashes"):
            await publisher.publish_kv(KvEventBatch(0, 0.0, (BlockRemoved((2**64,)),)))
        await publisher.close(flush_timeout=0)
        with pytest.raises(RuntimeError, match="closed"):
            await publisher.publish_kv(batch(0))

    run(scenario())
