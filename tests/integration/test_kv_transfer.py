"""KV transfer between real servers: gRPC pulls between two grpc.aio KvTransfer servers on port 0
(bit-identical blocks, crc mismatch, unknown / released / expired handles, layout mismatch,
cancel mid-stream, a release during the stream, pacing, timeout, unreachable holder, stock
stubs, the mocker's zero-layer cache), and shared-memory pulls between two processes
(bit-identical, a handle gone before the copy is confirmed, a killed holder, no segment left).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
import uuid
from typing import Self

import grpc
import pytest
import torch

from ferry.v1 import worker_pb2, worker_pb2_grpc
from kvcache.transfer.errors import (
    HandleNotFound,
    KvLayoutMismatch,
    TransferIntegrityError,
    TransferTimeout,
    TransportUnavailable,
)
from kvcache.transfer.grpc_transport import (
    SERVER_OPTIONS,
    KvTransferServicer,
    close_channels,
    pull_grpc,
    release_remote,
)
from kvcache.transfer.handles import HandleRegistry, KvHandleInfo
from kvcache.transfer.layout import KvCacheView
from kvcache.transfer.puller import pull
from kvcache.transfer.shm import SHM_DIR, SharedKvArena, detach_all, remove_stale_segments
from kvcache.transfer.wire import handle_from_proto, handle_to_proto

pytestmark = pytest.mark.timeout(180)

BS, H, D = 4, 2, 8


def run(coro, timeout: float = 60.0):
    async def main():
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            await close_channels()

    return asyncio.run(main())


def seeded_caches(num_blocks, seed, dtype=torch.bfloat16, layers=3, heads=H):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_blocks * BS, heads, D, generator=g).to(dtype)
            for _ in range(layers)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Server:
    """One worker's KvTransfer side: a registry, its cache and a real grpc.aio server, on an
    event loop of its own in a thread (as in another process: a test may block it)."""

    def __init__(self, caches, *, num_blocks=None, servicer_cls=KvTransferServicer,
                 max_chunk_bytes=4 << 20, ttl_s=30.0, stock_registration=False,
                 block_size=BS) -> None:
        self.clock = FakeClock()
        self.released: list[KvHandleInfo] = []
        self.registry = HandleRegistry(ttl_s, self.released.append, clock=self.clock)
        self.view = KvCacheView(caches, block_size, num_blocks=num_blocks)
        self.servicer = servicer_cls(self.registry, self.view, max_chunk_bytes=max_chunk_bytes)
        self.stock_registration = stock_registration
        self.address = ""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _on_loop(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def _start(self) -> None:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        if self.stock_registration:
            worker_pb2_grpc.add_KvTransferServicer_to_server(self.servicer, self.server)
        else:
            self.servicer.add_to_server(self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"

    async def __aenter__(self) -> Self:
        self.thread.start()
        await self._on_loop(self._start())
        return self

    async def __aexit__(self, *exc) -> None:
        await self._on_loop(self.server.stop(0))
        self.servicer.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def handle(self, block_ids, address=None) -> KvHandleInfo:
        n = len(block_ids)
        return self.registry.create(block_ids, list(range(100, 100 + n - 1)), n * BS - 1, BS,
                                    "prefill-0", address or self.address)


class SlowView(KvCacheView):
    """A destination that writes slowly (``delay`` s a chunk), or holds its first write until
    ``go`` is set. Writes run on the puller's event loop, so either stalls the puller."""

    def __init__(self, *args, delay=0.0, **kw) -> None:
        super().__init__(*args, **kw)
        self.delay, self.writes = delay, 0
        self.first_write, self.go = threading.Event(), threading.Event()
        self.on_first_write = None

    def write_block_bytes(self, *args) -> None:
        super().write_block_bytes(*args)
        self.writes += 1
        if not self.first_write.is_set() and self.on_first_write is not None:
            self.on_first_write()
        self.first_write.set()
        if self.delay:
            time.sleep(self.delay)
        else:
            self.go.wait(30)


class CorruptingServicer(KvTransferServicer):
    """Flips one payload byte of the second chunk after its crc32 was computed."""

    def _chunk(self, block_id, start, end):
        raw = super()._chunk(block_id, start, end)
        if self.chunks_read == 2:
            raw = bytearray(raw)
            raw[len(raw) // 2] ^= 0x01
            raw = bytes(raw)
        return raw


class GatedServicer(KvTransferServicer):
    """Holds the read of the third chunk until ``gate`` is set (on the holder's loop)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.waiting, self.gate = threading.Event(), threading.Event()

    def _chunk(self, block_id, start, end):
        if self.chunks_read == 2:
            self.waiting.set()
            self.gate.wait(30)
        return super()._chunk(block_id, start, end)


async def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- gRPC -----------------------------------------------------------------------------------------

def test_grpc_pull_between_two_servers_is_bit_identical_and_releases():
    async def main():
        async with Server(seeded_caches(10, seed=1), max_chunk_bytes=512) as prefill, \
                Server(seeded_caches(12, seed=2)) as decode:
            assert prefill.servicer.layer_groups == [(0, 2), (2, 3)]  # 2 chunks per block
            h = prefill.handle([7, 2, 3, 9])
            before = decode.view.read_blocks(range(12))
            result = await pull(h, decode.view, [0, 11, 5, 6], timeout_s=30)
            assert (result.transport, result.blocks, result.released) == ("grpc", 4, True)
            assert result.nbytes == 4 * decode.view.layout.block_nbytes
            assert torch.equal(decode.view.read_blocks([0, 11, 5, 6]),
                               prefill.view.read_blocks([7, 2, 3, 9]))
            untouched = [b for b in range(12) if b not in (0, 11, 5, 6)]
            assert torch.equal(decode.view.read_blocks(untouched), before[:, :, untouched])
            assert prefill.released == [h] and len(prefill.registry) == 0
            # the other way round, a subset of a handle's blocks
            back = decode.handle([1, 2, 3])
            part = await pull_grpc(decode.address, back, prefill.view, [0, 1],
                                   timeout_s=30, src_block_ids=[3, 1])
            assert (part.blocks, part.released) == (2, None)
            assert torch.equal(prefill.view.read_blocks([0, 1]), decode.view.read_blocks([3, 1]))
            assert decode.released == [] and await release_remote(decode.address, back.handle_id)
            assert decode.released == [back]
            assert not await release_remote(decode.address, back.handle_id)

    run(main())


def test_a_corrupted_chunk_fails_the_crc_check_and_the_handle_is_still_released():
    async def main():
        async with Server(seeded_caches(6, seed=1), servicer_cls=CorruptingServicer,
                          max_chunk_bytes=512) as prefill:
            dest = KvCacheView(seeded_caches(6, seed=9), BS)
            h = prefill.handle([0, 1, 2])
            with pytest.raises(TransferIntegrityError, match="crc32 mismatch") as info:
                await pull(h, dest, [3, 4, 5], timeout_s=30)
            assert "the transfer is corrupt" in str(info.value)
            assert prefill.released == [h]

    run(main())


def test_unknown_released_and_expired_handles_get_clear_errors():
    async def main():
        async with Server(seeded_caches(6, seed=1), ttl_s=5) as prefill:
            dest = KvCacheView(seeded_caches(6, seed=2), BS)
            ghost = KvHandleInfo("no-such", "prefill-0", (0,), (), 3, BS, prefill.address)
            with pytest.raises(HandleNotFound, match="'no-such' is unknown on this worker"):
                await pull_grpc(prefill.address, ghost, dest, [0], timeout_s=30)
            h = prefill.handle([0, 1])
            assert prefill.registry.release(h.handle_id)
            with pytest.raises(HandleNotFound, match="was released; its blocks are no longer"):
                await pull_grpc(prefill.address, h, dest, [0, 1], timeout_s=30)
            old = prefill.handle([2, 3])
            prefill.clock.now += 5
            with pytest.raises(HandleNotFound, match=r"expired \(not released within its TTL"):
                await pull(old, dest, [0, 1], timeout_s=30)
            assert prefill.released == [h, old]

    run(main())


def test_a_layout_mismatch_is_refused_by_the_holder_naming_the_fields():
    async def main():
        async with Server(seeded_caches(6, seed=1, dtype=torch.float16)) as prefill:
            h = prefill.handle([0, 1])
            dest = KvCacheView(seeded_caches(6, seed=2, dtype=torch.bfloat16), BS)
            with pytest.raises(KvLayoutMismatch, match="dtype bfloat16 != float16"):
                await pull_grpc(prefill.address, h, dest, [0, 1], timeout_s=30)
            wide = KvCacheView(seeded_caches(6, seed=2, dtype=torch.float16, heads=4), BS)
            with pytest.raises(KvLayoutMismatch, match="num_kv_heads 4 != 2"):
                await pull_grpc(prefill.address, h, wide, [0, 1], timeout_s=30)
            with pytest.raises(ValueError, match="2 blocks to pull .* but 3 destination"):
                await pull_grpc(prefill.address, h, dest, [0, 1, 2], timeout_s=30)
            assert prefill.registry.get(h.handle_id) is h  # refusals do not end the handle

    run(main())


def test_cancel_mid_stream_leaves_the_handle_pinned_until_release_or_ttl():
    async def main():
        async with Server(seeded_caches(16, seed=1), max_chunk_bytes=512, ttl_s=10) as prefill:
            dest = SlowView(seeded_caches(16, seed=2), BS, delay=0.05)
            for ending in ("release", "ttl"):
                h = prefill.handle(list(range(16)))
                task = asyncio.ensure_future(pull_grpc(prefill.address, h, dest, list(range(16)),
                                                       timeout_s=30))
                await wait_for(dest.first_write.is_set)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                writes = dest.writes
                await asyncio.sleep(0.3)
                assert dest.writes == writes  # nothing written after the pull returned
                assert writes < 32
                assert prefill.registry.get(h.handle_id) is h and prefill.released == []
                if ending == "release":
                    assert await release_remote(prefill.address, h.handle_id)
                else:
                    prefill.clock.now += 10
                    await wait_for(lambda h=h: prefill.registry.expire() == [h])
                await wait_for(lambda h=h: prefill.released == [h])
                prefill.released.clear()
                dest.first_write.clear()

    run(main())


def test_a_release_during_the_stream_stops_it_and_unpins_once_it_ends():
    async def main():
        async with Server(seeded_caches(16, seed=1), servicer_cls=GatedServicer,
                          max_chunk_bytes=512) as prefill:
            dest = KvCacheView(seeded_caches(16, seed=2), BS)
            h = prefill.handle(list(range(16)))
            task = asyncio.ensure_future(pull_grpc(prefill.address, h, dest, list(range(16)),
                                                   timeout_s=30))
            await wait_for(prefill.servicer.waiting.is_set)  # mid-stream, reading chunk 3
            assert prefill.registry.release(h.handle_id)  # e.g. the request was cancelled
            assert prefill.released == []  # the stream still holds its lease
            prefill.servicer.gate.set()
            with pytest.raises(HandleNotFound, match="was released during the pull"):
                await task
            await wait_for(lambda: prefill.released == [h])

    run(main())


def test_the_holder_streams_only_as_fast_as_the_puller_reads():
    async def main():
        big = [torch.zeros(2, 40 * 64, 16, 64, dtype=torch.float16) for _ in range(4)]
        for i, c in enumerate(big):
            c.view(torch.int16).copy_(torch.randint(-30000, 30000, c.shape, dtype=torch.int16,
                                                    generator=torch.Generator().manual_seed(i)))
        async with Server(big, block_size=64) as prefill:
            assert prefill.view.layout.block_nbytes == 1 << 20  # a 1 MiB chunk per block
            dest = SlowView([torch.zeros_like(c) for c in big], 64)
            h = prefill.registry.create(list(range(40)), list(range(40)), 40 * 64, 64, "p",
                                        prefill.address)
            seen = []

            def unstick():  # the puller is stuck on its first write for a second
                seen.append(prefill.servicer.chunks_read)
                dest.go.set()

            timer = threading.Timer(1.0, unstick)
            dest.on_first_write = timer.start
            result = await pull_grpc(prefill.address, h, dest, list(range(40)), timeout_s=60)
            timer.join()
            assert seen and seen[0] < 30, f"the holder read {seen} of 40 chunks ahead"
            assert result.nbytes == 40 << 20
            assert torch.equal(dest.read_blocks(range(40)).view(torch.int16),  # NaN patterns too
                               prefill.view.read_blocks(range(40)).view(torch.int16))

    run(main(), timeout=120)


def test_a_pull_past_its_timeout_fails_and_releases():
    async def main():
        async with Server(seeded_caches(16, seed=1), max_chunk_bytes=512) as prefill:
            dest = SlowView(seeded_caches(16, seed=2), BS, delay=0.05)
            h = prefill.handle(list(range(16)))
            started = time.monotonic()
            with pytest.raises(TransferTimeout, match="DEADLINE_EXCEEDED"):
                await pull(h, dest, list(range(16)), timeout_s=0.4)
            assert time.monotonic() - started < 5
            await wait_for(lambda: prefill.released == [h])

    run(main())


def test_an_unreachable_holder_is_transport_unavailable():
    async def main():
        async with Server(seeded_caches(4, seed=1)) as gone:
            address = gone.address
        h = KvHandleInfo("h", "prefill-0", (0, 1), (5,), 7, BS, address)
        dest = KvCacheView(seeded_caches(4, seed=2), BS)
        with pytest.raises(TransportUnavailable, match="UNAVAILABLE"):
            await pull(h, dest, [0, 1], timeout_s=5)

    run(main())


def test_the_mocker_zero_layer_cache_transfers_no_bytes_but_everything_else_works():
    async def main():
        async with Server([], num_blocks=8) as prefill:
            dest = KvCacheView([], BS, num_blocks=4)
            h = prefill.handle([5, 6, 7])
            result = await pull(h, dest, [0, 1, 2], timeout_s=10)
            assert (result.nbytes, result.blocks, result.released) == (0, 3, True)
            assert prefill.released == [h]
            with pytest.raises(HandleNotFound, match="was released"):
                await pull(h, dest, [0, 1, 2], timeout_s=10)
            with pytest.raises(KvLayoutMismatch, match="num_layers 3 != 0"):
                await pull(prefill.handle([1]), KvCacheView(seeded_caches(4, 1), BS), [0],
                           timeout_s=10)

    run(main())


def test_stock_generated_stubs_interoperate_with_the_raw_codec():
    async def main():
        async with Server(seeded_caches(6, seed=1), stock_registration=True) as stock, \
                Server(seeded_caches(6, seed=3)) as fast:
            dest = KvCacheView(seeded_caches(6, seed=2), BS)
            await pull_grpc(stock.address, stock.handle([4, 5]), dest, [0, 1], timeout_s=30)
            assert torch.equal(dest.read_blocks([0, 1]), stock.view.read_blocks([4, 5]))
            async with grpc.aio.insecure_channel(fast.address) as channel:
                stub = worker_pb2_grpc.KvTransferStub(channel)
                h = fast.handle([2])
                chunks = [c async for c in stub.PullBlocks(worker_pb2.PullRequest(
                    handle_id=h.handle_id))]
            assert [(c.block_id, c.layer_start, c.layer_end) for c in chunks] == [(2, 0, 3)]
            assert chunks[0].data == fast.view.read_block_bytes(2, 0, 3).numpy().tobytes()
            import zlib

            assert chunks[0].crc32 == zlib.crc32(chunks[0].data)

    run(main())


def test_pull_falls_back_to_grpc_when_the_shared_segment_is_not_on_this_host():
    async def main():
        async with Server(seeded_caches(6, seed=1)) as prefill:
            dest = KvCacheView(seeded_caches(6, seed=2), BS)
            for scheme in ("shm", "cuda-ipc"):
                address = f"{scheme}://ferry-test-absent-{uuid.uuid4().hex[:8]}@{prefill.address}"
                h = prefill.handle([1, 3], address=address)
                result = await pull(h, dest, [4, 5], timeout_s=30)
                assert (result.transport, result.released) == ("grpc", True)
                assert torch.equal(dest.read_blocks([4, 5]), prefill.view.read_blocks([1, 3]))
                with pytest.raises(TransportUnavailable):
                    await pull(prefill.handle([0], address=address), dest, [0], timeout_s=30,
                               fallback_to_grpc=False)

    run(main())


# -- shared memory between two processes ------------------------------------------------------------

NUM_BLOCKS = 12


def _holder_main(name: str, commands, replies) -> None:
    """The prefill process: KV caches in shared memory, a KvTransfer gRPC server for release."""
    from kvcache.transfer.layout import KvLayout

    async def main():
        layout = KvLayout(3, BS, H, D, "bfloat16", NUM_BLOCKS)
        arena = SharedKvArena.create(name, layout)
        for cache, expected in zip(arena.caches, seeded_caches(NUM_BLOCKS, seed=5)):
            cache.copy_(expected)
        async with Server(arena.caches) as server:
            loop = asyncio.get_running_loop()
            replies.put(("ready", os.getpid()))
            while True:
                command, arg = await loop.run_in_executor(None, commands.get)
                if command == "handle":
                    h = server.handle(arg, address=arena.address(server.address))
                    replies.put(handle_to_proto(h).SerializeToString())
                elif command == "release":
                    replies.put(server.registry.release(arg))
                elif command == "released":
                    replies.put([info.handle_id for info in server.released])
                elif command == "stop":
                    break
        arena.close()
        replies.put("closed")

    asyncio.run(main())


@pytest.fixture
def holder():
    name = f"ferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_holder_main, args=(name, commands, replies), daemon=True)
    proc.start()
    state, pid = replies.get(timeout=120)
    assert state == "ready" and pid == proc.pid

    def ask(command, arg=None):
        commands.put((command, arg))
        return replies.get(timeout=60)

    yield name, proc, ask
    if proc.is_alive():
        commands.put(("stop", None))
        assert replies.get(timeout=60) == "closed"
        proc.join(timeout=60)
    with contextlib.suppress(ValueError):
        proc.close()
    detach_all()
    remove_stale_segments(name)
    left = [p.name for p in SHM_DIR.glob(f"{name}*")]
    assert left == [], f"segments left in /dev/shm: {left}"


def test_shm_pull_between_two_processes_is_bit_identical_and_cleans_up(holder):
    name, proc, ask = holder
    h = handle_from_proto(worker_pb2.KvHandle.FromString(ask("handle", [11, 0, 4, 5])))
    assert h.transport_address.startswith(f"shm://{name}@127.0.0.1:")
    dest = KvCacheView(seeded_caches(8, seed=6), BS)
    result = run(pull(h, dest, [7, 1, 2, 3], timeout_s=30))
    assert (result.transport, result.blocks, result.released) == ("shm", 4, True)
    expected = KvCacheView(seeded_caches(NUM_BLOCKS, seed=5), BS)
    assert torch.equal(dest.read_blocks([7, 1, 2, 3]), expected.read_blocks([11, 0, 4, 5]))
    assert ask("released") == [h.handle_id]
    assert (SHM_DIR / name).exists()
    ask("stop")
    proc.join(timeout=60)
    assert proc.exitcode == 0 and not (SHM_DIR / name).exists()


def test_an_shm_copy_of_a_handle_that_ended_meanwhile_is_discarded(holder):
    _name, _proc, ask = holder
    h = handle_from_proto(worker_pb2.KvHandle.FromString(ask("handle", [1, 2])))
    assert ask("release", h.handle_id) is True  # the request was cancelled on the holder
    dest = KvCacheView(seeded_caches(8, seed=6), BS)
    with pytest.raises(HandleNotFound, match="before the shm copy was confirmed"):
        run(pull(h, dest, [0, 1], timeout_s=30))


def test_a_killed_holder_fails_the_shm_pull_and_its_segment_is_removable(holder):
    name, proc, ask = holder
    h = handle_from_proto(worker_pb2.KvHandle.FromString(ask("handle", [1, 2])))
    proc.kill()
    proc.join(timeout=60)
    assert (SHM_DIR / name).exists()  # a crash leaves the segment behind
    dest = KvCacheView(seeded_caches(8, seed=6), BS)
    with pytest.raises(TransportUnavailable, match="could not confirm it with the holder"):
        run(pull(h, dest, [0, 1], timeout_s=30, release_timeout_s=2))
    detach_all()
    assert remove_stale_segments(name) == [name]
    assert not (SHM_DIR / name).exists()
