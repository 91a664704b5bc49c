"""kvcache.transfer.rpc_pull.pull_stream, the KV puller's HTTP/2 client, against real servers
on 127.0.0.1: a grpc.aio server (its own framing: big messages arrive over many DATA
frames) and ferry.rpc's (one frame per message), exact messages in order, the status of a
failed call, and an ``on_message`` failure ending the pull with nothing delivered after."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ferry.rpc.aio_compat import AioCompatServer
from kvcache.transfer.rpc_pull import RpcStatus, pull_stream

PATH = "/test.Pull/Stream"
SIZES = [0, 10, 1 << 20, 5 << 20, 3, 4 << 20]


def payload(i: int, size: int) -> bytes:
    return bytes((i * 31 + j) % 251 for j in range(min(size, 997))) * (size // 997 + 1)


MESSAGES = [payload(i, n)[:n] for i, n in enumerate(SIZES)]


async def stream(request: bytes, context):
    if request == b"fail":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such handle \u00e9")
    for m in MESSAGES:
        yield m


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def serving(kind: str):
    handlers = grpc.method_handlers_generic_handler("test.Pull", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream)})
    if kind == "grpc.aio":
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    else:
        server = AioCompatServer(max_receive_message_length=64 << 20)
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("kind", ["grpc.aio", "ferry.rpc"])
def test_messages_arrive_whole_and_in_order(kind):
    async def main():
        server, address = await serving(kind)
        try:
            for _ in range(2):  # the second pull reuses the first one's buffer
                got: list[bytes] = []
                await pull_stream(address, PATH, b"go", lambda m, got=got: got.append(bytes(m)))
                assert [len(m) for m in got] == SIZES and got == MESSAGES
        finally:
            await server.stop(0)
    run(main())


@pytest.mark.parametrize("kind", ["grpc.aio", "ferry.rpc"])
def test_a_failed_call_raises_its_status(kind):
    async def main():
        server, address = await serving(kind)
        try:
            with pytest.raises(RpcStatus) as info:
                await pull_stream(address, PATH, b"fail", lambda m: None)
            assert (info.value.code, info.value.message) == ("NOT_FOUND", "no such handle \u00e9")
        finally:
            await server.stop(0)
    run(main())


def test_on_message_raising_ends_the_pull_and_nothing_comes_after():
    async def main():
        server, address = await serving("ferry.rpc")
        seen = []

        def on_message(m):
            seen.append(len(m))
            if len(seen) == 3:
                raise ValueError("bad chunk")
        try:
            with pytest.raises(ValueError, match="bad chunk"):
                await pull_stream(address, PATH, b"go", on_message)
            await asyncio.sleep(0.2)  # anything still arriving is not delivered
            assert seen == SIZES[:3]
        finally:
            await server.stop(0)
    run(main())


def test_nothing_listening_is_an_oserror():
    async def main():
        server, address = await serving("ferry.rpc")
        await server.stop(0)
        with pytest.raises(OSError):
            await pull_stream(address, PATH, b"go", lambda m: None)
    run(main())


def test_a_message_given_as_buffers_arrives_as_their_concatenation():
    """ferry.rpc writes a list of buffers as one message (KvTransferServicer(gather=True))."""
    parts = [b"head", memoryview(bytes(range(256)) * 2048), b"", bytearray(b"tail") * 70000]

    async def gathered(request: bytes, context):
        yield parts  # big: written with writev
        yield [b"a", b"b"]  # small: queued

    async def main():
        handlers = grpc.method_handlers_generic_handler("test.Pull", {
            "Stream": grpc.unary_stream_rpc_method_handler(gathered)})
        server = AioCompatServer(max_receive_message_length=64 << 20)
        server.add_generic_rpc_handlers((handlers,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            got: list[bytes] = []
            await pull_stream(f"127.0.0.1:{port}", PATH, b"go", lambda m: got.append(bytes(m)))
            assert got == [b"".join(bytes(p) for p in parts), b"ab"]
        finally:
            await server.stop(0)
    run(main())


def test_a_bad_header_block_is_internal():
    """A holder sending a header block HPACK cannot decode ends the pull INTERNAL, a status
    the puller's caller maps (not a raw decoding error)."""
    from ferry.rpc import frames as fr

    async def main():
        async def answer(reader, writer):
            await reader.read(65536)  # the preface, settings and the call
            writer.write(fr.frame(fr.SETTINGS, 0, 0)
                         + fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1,
                                    b"\xff\xff\xff\xff"))
            await writer.drain()
            await reader.read(65536)
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(RpcStatus) as info:
                await pull_stream(f"127.0.0.1:{port}", PATH, b"go", lambda m: None)
            assert info.value.code == "INTERNAL"
            assert info.value.message.startswith("a bad header block from the holder")
        finally:
            server.close()
    run(main())
