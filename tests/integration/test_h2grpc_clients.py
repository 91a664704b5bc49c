"""proto/ferry/rpc against grpcio clients (sync and grpc.aio, raw bytes, no stubs):
unary and server-streaming calls, big messages and long streams, status codes and details,
unknown methods, the request size limit, client deadlines and cancels reaching the handler,
compressed requests, metadata and deadline as the handler sees them, many calls at once.
The server and its handlers: tests/helpers/h2_server.py."""

from __future__ import annotations

import asyncio
import json
import random
import time

import grpc
import pytest

from ferry.rpc import Status
from tests.helpers import h2_server
from tests.helpers.h2_server import (
    BOOM,
    CHANNEL_OPTIONS,
    FAIL,
    META,
    RAISE_AFTER,
    RETURN_NONE,
    SLOW,
    STREAM,
    UNARY,
    fail_request,
    item,
    rpc_error,
    run_async,
    serving,
    stream_request,
)

# The fixtures of h2_server this module uses (pytest finds fixtures among a module's names).
channel_fixture, probe_fixture, server_fixture = (
    h2_server.channel_fixture, h2_server.probe_fixture, h2_server.server_fixture)

pytestmark = pytest.mark.timeout(30)


def test_unary_echo_sync(channel):
    unary = channel.unary_unary(UNARY)
    assert unary(b"hello", timeout=5) == b"hello"
    assert unary(b"", timeout=5) == b""
    response, call = unary.with_call(b"\x00\xff" * 100, timeout=5)
    assert response == b"\x00\xff" * 100
    assert call.code() == grpc.StatusCode.OK and call.details() in ("", None)


def test_unary_echo_aio(server):
    async def main():
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
            unary = ch.unary_unary(UNARY)
            assert await unary(b"hello", timeout=5) == b"hello"
            call = unary(b"again", timeout=5)
            assert await call == b"again"
            assert await call.code() == grpc.StatusCode.OK
    run_async(main())


def test_stream_in_order_sync(channel):
    stream = channel.unary_stream(STREAM)
    assert list(stream(stream_request(5), timeout=5)) == [item(i, 8) for i in range(5)]
    assert list(stream(stream_request(1), timeout=5)) == [item(0, 8)]
    assert list(stream(stream_request(3, mode=RETURN_NONE), timeout=5)) == [
        item(i, 8) for i in range(3)]
    assert list(stream(stream_request(0, mode=RETURN_NONE), timeout=5)) == []


def test_stream_then_error_sync(channel):
    responses = channel.unary_stream(STREAM)(stream_request(3, mode=RAISE_AFTER), timeout=5)
    assert [next(responses) for _ in range(3)] == [item(i, 8) for i in range(3)]
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert info.value.details() == "after the messages"


def test_stream_in_order_aio(server):
    async def main():
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
            call = ch.unary_stream(STREAM)(stream_request(7, size=20), timeout=5)
            got = [m async for m in call]
            assert await call.code() == grpc.StatusCode.OK
            return got
    assert run_async(main()) == [item(i, 20) for i in range(7)]


def test_big_request_echoed(channel):
    payload = random.Random(1).randbytes(3 << 20)
    assert channel.unary_unary(UNARY)(payload, timeout=10) == payload


def test_stream_of_20000_small_messages(channel):
    got = list(channel.unary_stream(STREAM)(stream_request(20_000, size=10), timeout=10))
    assert len(got) == 20_000
    assert got == [item(i, 10) for i in range(20_000)]


def test_stream_of_1mb_messages(channel):
    got = list(channel.unary_stream(STREAM)(stream_request(4, size=1 << 20), timeout=10))
    assert [len(m) for m in got] == [1 << 20] * 4
    assert got == [item(i, 1 << 20) for i in range(4)]


def test_stream_of_1mb_messages_aio(server):
    async def main():
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
            return [m async for m in ch.unary_stream(STREAM)(stream_request(3, size=1 << 20),
                                                             timeout=10)]
    assert run_async(main()) == [item(i, 1 << 20) for i in range(3)]


@pytest.mark.parametrize("details", [
    "not here", "n\u00f6 \u2713 100% \U0001F600", "two\nlines\tand %41", ""])
def test_grpc_error_code_and_details(channel, details):
    e = rpc_error(channel.unary_unary(FAIL), fail_request(Status.NOT_FOUND, details), timeout=5)
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details() == details


def test_grpc_error_aio(server):
    async def main():
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(FAIL)(fail_request(Status.PERMISSION_DENIED,
                                                        "caf\u00e9 interdit"), timeout=5)
            return info.value
    e = run_async(main())
    assert (e.code(), e.details()) == (grpc.StatusCode.PERMISSION_DENIED, "caf\u00e9 interdit")


def test_plain_exception_is_unknown(channel):
    e = rpc_error(channel.unary_unary(BOOM), b"x", timeout=5)
    assert e.code() == grpc.StatusCode.UNKNOWN
    assert e.details() == "the method handler raised an exception (see the server's log)"


def test_unknown_method_is_unimplemented(channel):
    e = rpc_error(channel.unary_unary("/test.Echo/Nope"), b"x", timeout=5)
    assert e.code() == grpc.StatusCode.UNIMPLEMENTED
    assert e.details() == "unknown method /test.Echo/Nope"
    e = rpc_error(lambda: list(channel.unary_stream("/other.Svc/Unary")(b"x", timeout=5)))
    assert e.code() == grpc.StatusCode.UNIMPLEMENTED
    assert e.details() == "unknown method /other.Svc/Unary"


def test_request_over_the_limit_is_resource_exhausted(probe):
    with serving(probe, max_receive_message_length=1000) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch:
        unary = ch.unary_unary(UNARY)
        assert unary(b"a" * 1000, timeout=5) == b"a" * 1000
        e = rpc_error(unary, b"a" * 1001, timeout=5)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details() == "the request is larger than the server's limit of 1000 bytes"
        # Small on the wire, over the limit once decompressed.
        e = rpc_error(unary, bytes(5000), timeout=5, compression=grpc.Compression.Gzip)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert unary(b"ok", timeout=5) == b"ok"  # the connection is still good


def test_client_deadline_cancels_the_handler(channel, probe):
    start = time.monotonic()
    e = rpc_error(channel.unary_unary(SLOW), b"", timeout=0.3)
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 < time.monotonic() - start < 3
    probe.wait("slow cancelled")


def test_client_cancel_cancels_the_handler_aio(server, probe):
    async def main():
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
            call = ch.unary_unary(SLOW)(b"", timeout=10)
            await asyncio.to_thread(probe.wait, "slow started")
            assert call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.to_thread(probe.wait, "slow cancelled")
            assert await ch.unary_unary(UNARY)(b"next", timeout=5) == b"next"
    run_async(main())
    assert probe.counts["slow cancelled"] == 1


def test_client_cancel_cancels_the_handler_sync(channel, probe):
    future = channel.unary_unary(SLOW).future(b"", timeout=10)
    probe.wait("slow started")
    assert future.cancel()
    probe.wait("slow cancelled")
    assert future.cancelled()


def test_gzip_request_is_decompressed(channel):
    payload = b"compress me " * 10_000
    unary = channel.unary_unary(UNARY)
    assert unary(payload, timeout=5, compression=grpc.Compression.Gzip) == payload
    assert unary(payload, timeout=5, compression=grpc.Compression.Deflate) == payload


def test_metadata_and_deadline_in_server_call(channel, server):
    seen = json.loads(channel.unary_unary(META)(b"", timeout=5, metadata=(("k", "v"),)))
    assert seen["method"] == META
    metadata = [tuple(pair) for pair in seen["metadata"]]
    assert ("k", "v") in metadata
    names = {name for name, _ in metadata}
    assert not names & {"content-type", "te", "grpc-timeout", "grpc-encoding",
                        "grpc-accept-encoding"}
    assert not any(name.startswith(":") for name in names)
    assert 4.0 < seen["remaining"] <= 5.1  # grpc rounds its grpc-timeout up (5.0099 s seen)
    assert seen["peer"].startswith("127.0.0.1:")
    seen = json.loads(channel.unary_unary(META)(b""))
    assert seen["remaining"] is None


def test_200_concurrent_calls(server):
    async def main():
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
            unary, stream = ch.unary_unary(UNARY), ch.unary_stream(STREAM)

            async def streamed(n):
                return [m async for m in stream(stream_request(n, size=16), timeout=10)]
            unaries = [unary(b"call %d" % i, timeout=10) for i in range(150)]
            streams = [streamed(i % 10 + 1) for i in range(50)]
            return await asyncio.gather(*unaries), await asyncio.gather(*streams)
    unaries, streams = run_async(main())
    assert unaries == [b"call %d" % i for i in range(150)]
    assert streams == [[item(j, 16) for j in range(i % 10 + 1)] for i in range(50)]


def test_long_status_message_reaches_a_grpc_client(channel):
    details = "\u00e9" * 4096
    e = rpc_error(channel.unary_unary(FAIL), fail_request(Status.NOT_FOUND, details), timeout=5)
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details() and details.startswith(e.details())
