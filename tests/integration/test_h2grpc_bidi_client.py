"""ferry.rpc.client.BidiCall against a real grpc.aio server (127.0.0.1, port 0) on
the test's own event loop, serving raw-bytes stream-stream handlers of ``test.Bidi``:
messages echoed in order (interleaved, all written then all read, 20,000 small ones, 1 MiB
ones both ways, more than the client's 16 MiB receive window each way), done_writing ending
the server's request stream, abort statuses with their details, an unknown method, cancel()
reaching the handler, the server stopping, a refused connection, writing after
done_writing, and keepalive pings against grpc's ping policy. What a real server never does
is in test_h2grpc_bidi_client_wire.py (resets, odd HTTP statuses, silent peers) and
test_h2grpc_bidi_client_flow.py (tiny windows, split frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket

import grpc
import pytest

from ferry.rpc.client import BidiCall
from kvcache.transfer.grpc_transport import SERVER_OPTIONS as WORKER_OPTIONS

SERVICE = "test.Bidi"
OPTIONS = [("grpc.so_reuseport", 0),
           ("grpc.max_receive_message_length", 16 << 20),
           ("grpc.max_send_message_length", 16 << 20)]
# grpc's default ping policy (a ping more often than every 5 min without data is a strike,
# GOAWAY too_many_pings after 2) off: the keepalive tests ping every 0.1 s.
PERMISSIVE_PINGS = [("grpc.http2.min_ping_interval_without_data_ms", 1),
                    ("grpc.http2.max_ping_strikes", 0)]


def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def bidi(target: str, method: str, **kw) -> BidiCall:
    return BidiCall(target, f"/{SERVICE}/{method}", bytes, bytes, **kw)


@contextlib.asynccontextmanager
async def serving(options=(), **handlers):
    """A grpc.aio server on this loop with the given stream-stream handlers (raw bytes);
    yields (target, server); stopped at exit."""
    server = grpc.aio.server(options=OPTIONS + list(options))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.stream_stream_rpc_method_handler(h) for name, h in handlers.items()}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        await server.stop(0)


async def echo(requests, context):
    async for message in requests:
        yield message


async def read_all(call: BidiCall) -> list[bytes]:
    out = []
    while (message := await call.read()) is not grpc.aio.EOF:
        out.append(message)
    return out


async def error_of(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(awaitable, 5)
    return info.value


def test_echo_interleaved():
    messages = [b"m%d" % i * (i % 7) for i in range(300)]  # sizes 0 to 6 * 4 bytes

    async def main():
        async with serving(Echo=echo) as (target, _):
            call = bidi(target, "Echo")
            for m in messages:
                await call.write(m)
                assert await call.read() == m
            assert not call.done()
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.read() is grpc.aio.EOF
            assert call.done() and not call.cancel()
    run(main())


def test_echo_write_all_then_read_all():
    rng = random.Random(3)
    messages = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(2000)]  # ~3 MB

    async def main():
        async with serving(Echo=echo) as (target, _):
            call = bidi(target, "Echo")
            for m in messages:
                await call.write(m)
            await call.done_writing()
            assert await read_all(call) == messages
    run(main())


@pytest.mark.parametrize("count,size,options", [
    (20_000, 12, ()), (6, 1 << 20, ()),
    (6, 1 << 20, WORKER_OPTIONS),  # 16 MiB frames and windows announced to the client
])
def test_echo_many_or_big_messages(count, size, options):
    """Written and read at once (a writer task): grpc's 64 KiB windows both ways, or the
    options of the worker's server."""
    rng = random.Random(count)
    messages = [rng.randbytes(size) for _ in range(count)]

    async def main():
        async with serving(options, Echo=echo) as (target, _):
            call = bidi(target, "Echo")

            async def writer():
                for m in messages:
                    await call.write(m)
                await call.done_writing()
            writing = asyncio.ensure_future(writer())
            got = await read_all(call)
            await writing
            assert len(got) == count
            assert got == messages
    run(main(), timeout=20)


def test_more_than_the_receive_window_each_way():
    """24 MiB to the server (it answers their digest), then 24 MiB back as 1 MiB messages
    read after they all could have been sent: the client credits its 16 MiB windows back."""
    rng = random.Random(5)
    blobs = [rng.randbytes(1 << 20) for _ in range(24)]

    async def sink_then_source(requests, context):
        digest, count = hashlib.sha256(), 0
        async for blob in requests:
            digest.update(blob)
            count += 1
        yield digest.digest()
        for i in range(count):
            yield blobs[i]

    async def main():
        async with serving(SinkThenSource=sink_then_source) as (target, _):
            call = bidi(target, "SinkThenSource")
            for blob in blobs:
                await call.write(blob)
            await call.done_writing()
            assert await call.read() == hashlib.sha256(b"".join(blobs)).digest()
            got = await read_all(call)
            assert [len(b) for b in got] == [1 << 20] * 24
            assert got == blobs
    run(main(), timeout=30)


def test_done_writing_ends_the_requests_then_eof():
    ended = asyncio.Event()

    async def count(requests, context):
        n = 0
        async for _ in requests:
            n += 1
        ended.set()
        yield b"%d" % n

    async def main():
        async with serving(Count=count) as (target, _):
            call = bidi(target, "Count")
            for m in (b"a", b"", b"c"):
                await call.write(m)
            await call.done_writing()
            await call.done_writing()  # twice: nothing more happens
            await asyncio.wait_for(ended.wait(), 5)
            assert await call.read() == b"3"
            assert await call.read() is grpc.aio.EOF
            with pytest.raises(RuntimeError):
                await call.write(b"late")
    run(main())


def test_calls_are_independent_cancelling_one_leaves_the_others():
    async def main():
        async with serving(Echo=echo) as (target, _):
            calls = [bidi(target, "Echo") for _ in range(3)]
            for round_ in range(20):
                for i, call in enumerate(calls):
                    await call.write(b"%d:%d" % (i, round_))
                for i, call in enumerate(calls):
                    assert await call.read() == b"%d:%d" % (i, round_)
                if round_ == 10:
                    assert calls.pop(1).cancel()
            for call in calls:
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
    run(main())


def test_write_after_done_writing_raises_runtime_error():
    async def main():
        async with serving(Echo=echo) as (target, _):
            call = bidi(target, "Echo")
            await call.write(b"x")
            await call.done_writing()
            with pytest.raises(RuntimeError, match="done_writing"):
                await call.write(b"y")
            assert await read_all(call) == [b"x"]
    run(main())


@pytest.mark.parametrize("code,details", [
    (grpc.StatusCode.NOT_FOUND, "nope \u00e9"),
    (grpc.StatusCode.INVALID_ARGUMENT, "100% bad\nline two \U0001F600"),
    (grpc.StatusCode.INTERNAL, ""),
])
def test_abort_ends_the_call_with_its_status(code, details):
    async def first_then_abort(requests, context):
        async for message in requests:
            yield message
            await context.abort(code, details)

    async def main():
        async with serving(Abort=first_then_abort) as (target, _):
            call = bidi(target, "Abort")
            await call.write(b"one")
            assert await call.read() == b"one"
            e = await error_of(call.read())
            assert (e.code(), e.details()) == (code, details)
            assert call.done() and not call.cancel()
            e = await error_of(call.read())  # the same status, again
            assert (e.code(), e.details()) == (code, details)
            assert (await error_of(call.write(b"two"))).code() == code
    run(main())


def test_unknown_method_is_unimplemented():
    async def main():
        async with serving(Echo=echo) as (target, _):
            call = bidi(target, "Nope")
            await call.write(b"x")
            assert (await error_of(call.read())).code() == grpc.StatusCode.UNIMPLEMENTED
    run(main())


def test_cancel_reaches_the_handler_and_a_pending_read_raises_cancelled():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(requests, context):
        async for _ in requests:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        yield b"never"

    async def main():
        async with serving(Hang=hang) as (target, _):
            call = bidi(target, "Hang")
            await call.write(b"go")
            reading = asyncio.ensure_future(call.read())
            await asyncio.wait_for(started.wait(), 5)
            assert not reading.done()
            assert call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(reading, 2)
            await asyncio.wait_for(cancelled.wait(), 5)
            assert call.done() and not call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()
            with pytest.raises(asyncio.CancelledError):
                await call.write(b"after")
    run(main())


def test_server_stop_ends_a_pending_read_unavailable():
    started = asyncio.Event()

    async def hang(requests, context):
        started.set()
        await asyncio.sleep(60)
        yield b"never"

    async def main():
        async with serving(Hang=hang) as (target, server):
            call = bidi(target, "Hang")
            reading = asyncio.ensure_future(call.read())
            await asyncio.wait_for(started.wait(), 5)
            await server.stop(0)
            e = await error_of(reading)
            assert e.code() == grpc.StatusCode.UNAVAILABLE  # grpc: "Cancelling all calls"
            assert call.done()
    run(main())


def test_connection_refused_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        call = bidi(f"127.0.0.1:{port}", "Echo")
        e = await error_of(call.read())
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert f"127.0.0.1:{port}" in e.details()
        assert (await error_of(call.write(b"x"))).code() == grpc.StatusCode.UNAVAILABLE
        assert call.done()
    run(main())


def test_bad_targets_and_keepalives_refused():
    for target in ("nohost", "127.0.0.1:", ":80", "127.0.0.1:http"):
        with pytest.raises(ValueError, match="host:port"):
            bidi(target, "Echo")
    for ka, kt in ((0, 1), (1, 0), (-1, 1)):
        with pytest.raises(ValueError, match="keepalive"):
            bidi("127.0.0.1:1", "Echo", keepalive_s=ka, keepalive_timeout_s=kt)


def test_keepalive_pings_answered_by_grpc_keep_an_idle_call_open():
    async def main():
        async with serving(PERMISSIVE_PINGS, Echo=echo) as (target, _):
            call = bidi(target, "Echo", keepalive_s=0.1, keepalive_timeout_s=0.1)
            await call.write(b"a")
            assert await call.read() == b"a"
            reading = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({reading}, timeout=1.2)  # ~6 pings
            assert not done and not call.done()
            await call.write(b"b")
            assert await reading == b"b"
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
    run(main())


def test_keepalive_against_grpcs_default_ping_policy_ends_an_idle_call():
    """What grpc does to an idle call pinging more often than every 5 minutes (the worker's
    server keeps grpc's default policy; BidiCall pings every keepalive_s = 20 s while idle):
    after a few pings, GOAWAY ENHANCE_YOUR_CALM "too_many_pings", and the call is over."""
    async def main():
        async with serving(Echo=echo) as (target, _):
            call = bidi(target, "Echo", keepalive_s=0.1, keepalive_timeout_s=0.1)
            await call.write(b"a")
            assert await call.read() == b"a"
            e = await error_of(call.read())
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert "too_many_pings" in e.details()
    run(main())


def test_a_response_message_over_the_limit_ends_the_call():
    async def main():
        async with serving(Echo=echo) as (target, _):
            call = bidi(target, "Echo", max_receive_message_length=1000)
            await call.write(b"x" * 1000)
            assert await call.read() == b"x" * 1000
            await call.write(b"y" * 1001)
            e = await error_of(call.read())
            assert (e.code(), e.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               "a response message of 1001 bytes (limit 1000)")
    run(main())


def test_one_reader_at_a_time():
    async def main():
        async with serving(Echo=echo) as (target, _):
            call = bidi(target, "Echo")
            first = asyncio.ensure_future(call.read())
            for _ in range(500):  # until the first read waits for a message
                if call._reader is not None:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(RuntimeError, match="one reader at a time"):
                await call.read()
            await call.write(b"m")
            assert await asyncio.wait_for(first, 5) == b"m"
            call.cancel()
    run(main())
