"""ferry.rpc.aio_compat.AioCompatServer called by real grpc.aio clients: servicers registered
through a generated ``add_*Servicer_to_server`` and through ``method_handlers_generic_handler``
(resolved on a call's first use), every method kind with and without serializers, the
statuses servicers produce (abort, exceptions, set_code), the Context (done callbacks,
cancelled, metadata, deadline), 1,000 messages each way, and the server's life (ports, stop
with grace, wait_for_termination, TCP_NODELAY). The status, callback and port tests run
against grpc.aio.server too: what grpc.aio does is the expected outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import grpc
import pytest

from ferry.rpc.aio_compat import AioCompatServer
from ferry.rpc.server import GrpcServer
from ferry.v1 import worker_pb2, worker_pb2_grpc
from tests.helpers.h2_server import CHANNEL_OPTIONS
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

Code = grpc.StatusCode
KINDS = ("compat", "grpc.aio")


def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Worker(worker_pb2_grpc.WorkerServicer):
    """Generated servicer (protobuf): Abort unary, Generate an async generator, GenerateStream
    an echo with context.read()/write(); Info left as generated (UNIMPLEMENTED)."""

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=request.request_id == "known")

    async def Generate(self, request, context):
        for t in request.prompt_token_ids:
            yield worker_pb2.WorkerGenerateResponse(request_id=request.request_id,
                                                    new_token_ids=[t])
        yield worker_pb2.WorkerGenerateResponse(request_id=request.request_id, finished=True)

    async def GenerateStream(self, request_iterator, context):
        while (req := await context.read()) is not grpc.aio.EOF:
            await context.write(worker_pb2.GenerateStreamResponse(chunks=[
                worker_pb2.WorkerGenerateResponse(request_id=r.request_id)
                for r in req.requests]))


class Raw:
    """test.Raw (raw bytes, no serializers) and test.Proto (protobuf) generic handlers."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.done = asyncio.Event()
        self.ends: list[bool] = []  # context.cancelled() as each done callback saw it
        self.cancelled: list[bool] = []  # context.cancelled() as a held call's cancel saw it

    def _track(self, context) -> None:
        def ended(ctx) -> None:
            self.ends.append(ctx.cancelled())
            self.done.set()
        context.add_done_callback(ended)

    async def unary(self, request: bytes, context):
        self._track(context)
        if request == b"abort":
            await context.abort(Code.PERMISSION_DENIED, "not you")
        if request == b"boom":
            raise ValueError("boom")
        if request == b"set-raise":
            context.set_code(Code.FAILED_PRECONDITION)
            raise ValueError("after set_code")
        if request == b"missing":
            context.set_code(Code.NOT_FOUND)
            context.set_details("no such thing")
            return b"ignored"
        if request == b"hold":
            self.started.set()
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(context.cancelled())
                raise
        if request == b"meta":
            return json.dumps({"metadata": [list(m) for m in context.invocation_metadata()],
                               "remaining": context.time_remaining(),
                               "peer": context.peer()}).encode()
        return b"u:" + request

    @staticmethod
    def plain(request: bytes, context):  # a plain function, as grpc.aio allows
        return b"plain:" + request

    async def gen(self, request: bytes, context):  # unary-stream, async generator
        for i in range(int(request.rstrip(b"!"))):
            yield b"g%d" % i
        if request.endswith(b"!"):
            await context.abort(Code.DATA_LOSS, "stopped")

    async def written(self, request: bytes, context):  # unary-stream, coroutine + write
        for i in range(int(request)):
            await context.write(b"w%d" % i)

    async def total(self, request_iterator, context):  # stream-unary
        return b"+".join([m async for m in request_iterator])

    async def echo_read(self, request_iterator, context):  # stream-stream, read/write
        while (m := await context.read()) is not grpc.aio.EOF:
            await context.write(m)
        await context.write(b"eof")

    async def echo_iter(self, request_iterator, context):  # stream-stream, iterator + yield
        async for m in request_iterator:
            yield m
        yield b"end"

    async def count(self, request_iterator, context):  # stream-unary, protobuf
        ids = [r.request_id async for r in request_iterator]
        return worker_pb2.GenerateStreamResponse(chunks=[
            worker_pb2.WorkerGenerateResponse(request_id=i) for i in ids])

    def add_to(self, server) -> None:
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("test.Raw", {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Plain": grpc.unary_unary_rpc_method_handler(self.plain),
                "Gen": grpc.unary_stream_rpc_method_handler(self.gen),
                "Written": grpc.unary_stream_rpc_method_handler(self.written),
                "Total": grpc.stream_unary_rpc_method_handler(self.total),
                "EchoRead": grpc.stream_stream_rpc_method_handler(self.echo_read),
                "EchoIter": grpc.stream_stream_rpc_method_handler(self.echo_iter),
            }),
            grpc.method_handlers_generic_handler("test.Proto", {
                "Count": grpc.stream_unary_rpc_method_handler(
                    self.count, request_deserializer=worker_pb2.AbortRequest.FromString,
                    response_serializer=worker_pb2.GenerateStreamResponse.SerializeToString),
            })))


@contextlib.asynccontextmanager
async def serving(raw: Raw | None = None, kind: str = "compat"):
    """A server with Worker (generated) and ``raw``'s generic handlers, and a channel to it."""
    server = AioCompatServer() if kind == "compat" else grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(Worker(), server)
    (raw or Raw()).add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=CHANNEL_OPTIONS) as channel:
            yield server, channel, port
    finally:
        await server.stop(0)


async def items(*messages):
    for m in messages:
        yield m


async def code_of(awaitable) -> tuple[Code, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code(), info.value.details()


def test_generated_servicer_protobuf_unary_stream_and_bidi():
    async def main():
        async with serving() as (server, channel, _):
            # add_registered_method_handlers put them in the table before any call.
            assert "/ferry.v1.Worker/GenerateStream" in server._server.methods
            stub = worker_pb2_grpc.WorkerStub(channel)
            assert (await stub.Abort(worker_pb2.AbortRequest(request_id="known"))).found
            assert not (await stub.Abort(worker_pb2.AbortRequest(request_id="x"))).found
            chunks = [c async for c in stub.Generate(
                worker_pb2.WorkerGenerateRequest(request_id="r", prompt_token_ids=[5, 6, 7]))]
            assert [(c.request_id, list(c.new_token_ids), c.finished) for c in chunks] == [
                ("r", [5], False), ("r", [6], False), ("r", [7], False), ("r", [], True)]
            call = stub.GenerateStream()
            for ids in (["a"], ["b", "c"], []):
                await call.write(worker_pb2.GenerateStreamRequest(requests=[
                    worker_pb2.WorkerGenerateRequest(request_id=i) for i in ids]))
                reply = await call.read()
                assert [c.request_id for c in reply.chunks] == ids
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == Code.OK
    run(main())


def test_generic_handlers_every_kind_raw_and_protobuf_resolved_on_first_call():
    async def main():
        async with serving() as (server, channel, _):
            assert "/test.Raw/Unary" not in server._server.methods
            assert await channel.unary_unary("/test.Raw/Unary")(b"hi") == b"u:hi"
            assert "/test.Raw/Unary" in server._server.methods  # kept once resolved
            assert [m async for m in channel.unary_stream("/test.Raw/Gen")(b"3")] == [
                b"g0", b"g1", b"g2"]
            assert [m async for m in channel.unary_stream("/test.Raw/Written")(b"2")] == [
                b"w0", b"w1"]
            assert [m async for m in channel.unary_stream("/test.Raw/Written")(b"0")] == []
            parts = (b"a", b"", b"c")
            assert await channel.stream_unary("/test.Raw/Total")(items(*parts)) == b"a++c"
            for method, last in (("EchoIter", b"end"), ("EchoRead", b"eof")):
                echo = channel.stream_stream(f"/test.Raw/{method}")
                assert [m async for m in echo(items(*parts))] == [*parts, last]
            count = channel.stream_unary(  # protobuf through a generic handler
                "/test.Proto/Count", request_serializer=worker_pb2.AbortRequest.SerializeToString,
                response_deserializer=worker_pb2.GenerateStreamResponse.FromString)
            reply = await count(items(*(worker_pb2.AbortRequest(request_id=i) for i in "xyz")))
            assert [c.request_id for c in reply.chunks] == ["x", "y", "z"]
    run(main())


@pytest.mark.parametrize("method", ["EchoRead", "EchoIter"])
def test_stream_stream_1000_messages_each_way_in_order_then_eof(method):
    async def main():
        async with serving() as (_, channel, _port):
            call = channel.stream_stream(f"/test.Raw/{method}")()
            sent = [b"m%d" % i for i in range(1000)]

            async def send():
                for m in sent:
                    await call.write(m)
                await call.done_writing()
            sender = asyncio.create_task(send())
            got = [m async for m in call]
            await sender
            # The half-close ended the server's reading (EOF / the iterator), then its last.
            assert got == [*sent, b"eof" if method == "EchoRead" else b"end"]
            assert await call.code() == Code.OK
    run(main(), timeout=20.0)


@pytest.mark.parametrize("kind", KINDS)
def test_statuses_of_abort_exception_set_code_and_unknown_method(kind):
    async def main():
        async with serving(kind=kind) as (_, channel, _port):
            unary = channel.unary_unary("/test.Raw/Unary")
            assert await code_of(unary(b"abort")) == (Code.PERMISSION_DENIED, "not you")
            assert (await code_of(unary(b"boom")))[0] == Code.UNKNOWN
            assert await code_of(unary(b"missing")) == (Code.NOT_FOUND, "no such thing")
            gen = channel.unary_stream("/test.Raw/Gen")(b"3!")
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for m in gen:
                    got.append(m)
            assert got == [b"g0", b"g1", b"g2"]
            assert (info.value.code(), info.value.details()) == (Code.DATA_LOSS, "stopped")
            for path in ("/test.Raw/Nope", "/test.Nope/Unary", "/ferry.v1.Worker/Nope"):
                assert (await code_of(channel.unary_unary(path)(b"")))[0] == Code.UNIMPLEMENTED
            assert await unary(b"after") == b"u:after"  # the connection goes on
    run(main())




@pytest.mark.parametrize("kind", ["compat", "grpc.aio"])
def test_set_code_then_raise_plain_functions_and_unimplemented_generated_methods(kind):
    async def main():
        async with serving(kind=kind) as (_, channel, _port):
            unary = channel.unary_unary("/test.Raw/Unary")
            assert (await code_of(unary(b"set-raise")))[0] == Code.FAILED_PRECONDITION
            assert await channel.unary_unary("/test.Raw/Plain")(b"p") == b"plain:p"
            stub = worker_pb2_grpc.WorkerStub(channel)
            assert (await code_of(stub.Info(worker_pb2.InfoRequest())))[0] == Code.UNIMPLEMENTED
    run(main())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("request_", [b"ok", b"abort"])
def test_done_callback_once_when_the_call_ends(kind, request_):
    async def main():
        raw = Raw()
        async with serving(raw, kind) as (_, channel, _port):
            unary = channel.unary_unary("/test.Raw/Unary")
            if request_ == b"ok":
                assert await unary(request_) == b"u:ok"
            else:
                assert (await code_of(unary(request_)))[0] == Code.PERMISSION_DENIED
            await asyncio.wait_for(raw.done.wait(), 2.0)
            assert await unary(b"next") == b"u:next"  # a second call, a second callback
            await wait_until(lambda: len(raw.ends) >= 2, 2.0, "the second callback")
            assert raw.ends == [False, False]
    run(main())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_client_cancel_or_deadline_runs_done_callback_and_cancelled_is_true(kind, how):
    async def main():
        raw = Raw()
        async with serving(raw, kind) as (_, channel, _port):
            call = channel.unary_unary("/test.Raw/Unary")(
                b"hold", timeout=0.2 if how == "deadline" else None)
            await asyncio.wait_for(raw.started.wait(), 2.0)
            if how == "cancel":
                call.cancel()
            await asyncio.wait_for(raw.done.wait(), 2.0)
            assert len(raw.ends) == 1
            if kind == "compat":  # grpc.aio 1.85 answers False in both places
                assert (raw.ends, raw.cancelled) == ([True], [True])
            assert await call.code() == (Code.CANCELLED if how == "cancel"
                                         else Code.DEADLINE_EXCEEDED)
    run(main())


def test_invocation_metadata_time_remaining_and_peer():
    async def main():
        async with serving() as (_, channel, _port):
            reply = json.loads(await channel.unary_unary("/test.Raw/Unary")(
                b"meta", timeout=5.0, metadata=(("x-tenant", "t1"), ("x-trace", "abc"))))
            metadata = [tuple(m) for m in reply["metadata"]]
            assert ("x-tenant", "t1") in metadata and ("x-trace", "abc") in metadata
            assert not [k for k, _ in metadata if k.startswith((":", "grpc-"))]
            assert 4.0 < reply["remaining"] <= 5.1  # grpc rounds grpc-timeout up a little
            assert reply["peer"].startswith("ipv4:127.0.0.1:")
            untimed = json.loads(await channel.unary_unary("/test.Raw/Unary")(b"meta"))
            assert untimed["remaining"] is None
    run(main())


def test_add_insecure_port_returns_the_port_or_0_when_in_use():
    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            server = AioCompatServer()
            assert server.add_insecure_port(f"127.0.0.1:{port}") == 0
            free = server.add_insecure_port("127.0.0.1:0")
            assert free > 0 and free != port
            with socket.create_connection(("127.0.0.1", free), timeout=2.0):
                pass  # listening from add_insecure_port on
    run(main())




@pytest.mark.parametrize("kind", ["compat", "grpc.aio"])
def test_every_added_port_is_served(kind):
    async def main():
        server = AioCompatServer() if kind == "compat" else grpc.aio.server()
        Raw().add_to(server)
        ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(2)]
        await server.start()
        try:
            for port in ports:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                     options=CHANNEL_OPTIONS) as channel:
                    unary = channel.unary_unary("/test.Raw/Unary")
                    assert await unary(b"p", timeout=2.0) == b"u:p"
        finally:
            await server.stop(0)
    run(main())


def nodelay(server: GrpcServer) -> list[int]:
    return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                            socket.TCP_NODELAY)
            for c in server.connections]


def test_accepted_sockets_have_tcp_nodelay():
    async def main():
        async with serving() as (server, channel, _port):
            assert await channel.unary_unary("/test.Raw/Unary")(b"x") == b"u:x"
            assert nodelay(server._server) == [1]
        # A listening socket made without IPPROTO_TCP: asyncio leaves Nagle on, ferry.rpc not.
        plain = GrpcServer({})
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = await plain.start_on(listener)
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await wait_until(lambda: plain.connections, 2.0, "the connection accepted")
            assert nodelay(plain) == [1]
            writer.close()
            await plain.stop(0)
    run(main())


@pytest.mark.parametrize("grace", [5.0, 0.05])
def test_stop_grace_then_wait_for_termination(grace):
    """A running call finishes within the grace period, or then ends UNAVAILABLE."""
    async def main():
        raw = Raw()
        async with serving(raw) as (server, channel, _port):
            waiting = asyncio.create_task(server.wait_for_termination())
            call = channel.unary_unary("/test.Raw/Unary")(b"hold")
            await asyncio.wait_for(raw.started.wait(), 2.0)
            stopping = asyncio.create_task(server.stop(grace))
            await asyncio.sleep(0)  # the stop task's first step: GOAWAY, then the grace wait
            assert server._server.stopping and not waiting.done()
            if grace > 1:
                raw.gate.set()
                assert await call == b"u:hold"
            else:
                assert (await code_of(call))[0] == Code.UNAVAILABLE
            await asyncio.wait_for(stopping, 2.0)
            await asyncio.wait_for(waiting, 1.0)
            assert len(raw.ends) == 1
    run(main())
