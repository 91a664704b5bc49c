"""orchestrator/h2grpc against real clients: a GrpcServer on 127.0.0.1 (port 0) on its own event
loop in a thread, with small handlers, called by grpcio (sync and grpc.aio, raw bytes, no
stubs) and by a raw socket client that writes HTTP/2 frames by hand for what grpc clients never
do (bad prefaces, odd requests, tiny windows, resets, too many streams). Then stop(): grace,
GOAWAY, UNAVAILABLE after the grace, nothing left open."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import gzip
import json
import random
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Self

import grpc
import hpack
import pytest

from orchestrator.h2grpc import GrpcError, GrpcServer, ServerCall, Status
from orchestrator.h2grpc import frames as fr
from orchestrator.h2grpc.call import HIGH_WATER
from orchestrator.h2grpc.connection import STREAM_WINDOW
from orchestrator.h2grpc.frames import H2Error
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

UNARY, STREAM, FAIL, BOOM, SLOW, META, GATE, WRONG_RETURN, WRONG_WRITE = (
    f"/test.Echo/{m}" for m in ("Unary", "Stream", "Fail", "Boom", "Slow", "Meta", "Gate",
                                "WrongReturn", "WrongWrite"))
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0),
                   ("grpc.max_receive_message_length", 16 << 20),
                   ("grpc.max_send_message_length", 16 << 20)]
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
RETURN_LAST, RETURN_NONE, RAISE_AFTER = 0, 1, 2


def item(i: int, size: int) -> bytes:
    """The i-th message of a Stream call: its number, padded to ``size`` bytes."""
    return (b"%08d" % i).ljust(size, b".")


def stream_request(count: int, size: int = 8, mode: int = RETURN_LAST) -> bytes:
    return struct.pack(">IIB", count, size, mode)


def fail_request(code: int, details: str) -> bytes:
    return bytes([code]) + details.encode()


# ---------------------------------------------------------------------- the server side


class Probe:
    """The handlers, and what they saw: counted events the test thread waits for."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.counts: collections.Counter[str] = collections.Counter()
        self.gate = asyncio.Event()  # set on the server's loop (ServerThread.release)
        self.methods = {UNARY: self.unary, STREAM: self.stream, FAIL: self.fail,
                        BOOM: self.boom, SLOW: self.slow, META: self.meta, GATE: self.gated,
                        WRONG_RETURN: self.wrong_return, WRONG_WRITE: self.wrong_write}

    def hit(self, what: str) -> None:
        with self._cond:
            self.counts[what] += 1
            self._cond.notify_all()

    def wait(self, what: str, n: int = 1, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.counts[what] >= n, timeout):
                raise AssertionError(f"{what!r} seen {self.counts[what]} times, not {n}, "
                                     f"within {timeout}s")

    async def unary(self, request: bytes, call: ServerCall) -> bytes:
        return request

    async def stream(self, request: bytes, call: ServerCall) -> bytes | None:
        count, size, mode = struct.unpack(">IIB", request)
        try:
            for i in range(count - 1 if mode == RETURN_LAST else count):
                await call.write(item(i, size))
                self.hit("stream wrote")
        except asyncio.CancelledError:
            self.hit("stream cancelled")
            raise
        if mode == RAISE_AFTER:
            raise GrpcError(Status.ABORTED, "after the messages")
        return item(count - 1, size) if mode == RETURN_LAST else None

    async def fail(self, request: bytes, call: ServerCall) -> bytes:
        raise GrpcError(request[0], request[1:].decode())

    async def boom(self, request: bytes, call: ServerCall) -> bytes:
        raise RuntimeError("a bug in the handler")

    async def wrong_return(self, request: bytes, call: ServerCall):
        return "a str, not bytes"  # a handler's bug

    async def wrong_write(self, request: bytes, call: ServerCall):
        await call.write("a str, not bytes")  # a handler's bug
        return b"never"

    async def slow(self, request: bytes, call: ServerCall) -> bytes:
        self.hit("slow started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.hit("slow cancelled")
            raise
        return b"late"

    async def meta(self, request: bytes, call: ServerCall) -> bytes:
        return json.dumps({"method": call.method, "metadata": call.metadata,
                           "remaining": call.time_remaining(), "peer": call.peer}).encode()

    async def gated(self, request: bytes, call: ServerCall) -> bytes:
        self.hit("gate entered")
        await self.gate.wait()
        return b"released:" + request


class ServerThread:
    """A GrpcServer for ``probe``'s methods on an event loop in a thread of its own."""

    def __init__(self, probe: Probe, **options) -> None:
        self.probe = probe
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="h2grpc-test",
                                        daemon=True)
        self._thread.start()
        self.server = GrpcServer(probe.methods, **options)
        self.port = self.run(self.server.start("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.probe.gate.set)

    async def stop_and_count(self, grace_s: float) -> int:
        """stop(grace_s), then how many connections the server still holds at that moment."""
        await self.server.stop(grace_s=grace_s)
        return len(self.server.connections)

    def connection_count(self) -> int:
        async def count() -> int:
            return len(self.server.connections)
        return self.run(count())

    def close(self) -> None:
        try:
            self.run(self.server.stop(0.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            assert not self._thread.is_alive()
            self.loop.close()


@contextlib.contextmanager
def serving(probe: Probe, **options):
    server = ServerThread(probe, **options)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(probe):
    with serving(probe) as s:
        yield s


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
        yield ch


def run_async(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------- a. grpc clients


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
    assert 4.0 < seen["remaining"] <= 5.0
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


# ---------------------------------------------------------------------- b. raw HTTP/2


class Frame(NamedTuple):
    type: int
    flags: int
    sid: int
    payload: bytes


@dataclass
class Seen:
    """What one stream received."""

    blocks: list[list[tuple[str, str]]] = field(default_factory=list)
    raw_blocks: list[bytes] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    sizes: list[int] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    @property
    def fields(self) -> dict[str, str]:
        return dict(self.blocks[-1])

    @property
    def status(self) -> int:
        return int(self.fields["grpc-status"])

    @property
    def message(self) -> str:
        return urllib.parse.unquote(self.fields.get("grpc-message", ""), errors="strict")

    @property
    def messages(self) -> list[bytes]:
        out, pos = [], 0
        while pos < len(self.data):
            flag, n = fr.MESSAGE_PREFIX.unpack_from(self.data, pos)
            assert flag == 0
            out.append(bytes(self.data[pos + 5:pos + 5 + n]))
            pos += 5 + n
        assert pos == len(self.data)
        return out


def grpc_body(*messages: bytes, compressed: bool = False) -> bytes:
    return b"".join(fr.MESSAGE_PREFIX.pack(int(compressed), len(m)) + m for m in messages)


class RawClient:
    """HTTP/2 by hand over a blocking socket; every read has a timeout (no test hangs)."""

    def __init__(self, port: int, settings: dict[int, int] | None = None,
                 handshake: bool = True, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = bytearray()
        self.streams: dict[int, Seen] = collections.defaultdict(Seen)
        self.server_settings: dict[int, int] = {}
        self._block: tuple[int, int, bytearray] | None = None
        self._pings = 0
        if handshake:
            self.send(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0,
                                            fr.settings_payload(settings or {})))
            # The server's SETTINGS and WINDOW_UPDATE, then its ACK of ours.
            self.until(lambda f: f.type == fr.SETTINGS and f.flags & fr.ACK)
            self.send(fr.frame(fr.SETTINGS, fr.ACK, 0))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def read(self) -> Frame | None:
        """The next frame (None: the server closed the connection)."""
        while True:
            if len(self.buf) >= 9:
                length_type, flags, sid = fr.FRAME_HEADER.unpack_from(self.buf)
                length = length_type >> 8
                if len(self.buf) >= 9 + length:
                    f = Frame(length_type & 0xFF, flags, sid & 0x7FFFFFFF,
                              bytes(self.buf[9:9 + length]))
                    del self.buf[:9 + length]
                    self._note(f)
                    return f
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                assert not self.buf, f"the connection closed inside a frame: {bytes(self.buf)!r}"
                return None
            self.buf += chunk

    def _note(self, f: Frame) -> None:
        seen = self.streams[f.sid] if f.sid else None
        if f.type == fr.SETTINGS and not f.flags & fr.ACK:
            self.server_settings.update(fr.parse_settings(f.payload))
        elif f.type == fr.DATA:
            seen.data += f.payload
            seen.sizes.append(len(f.payload))
            seen.ended = bool(f.flags & fr.END_STREAM)
        elif f.type == fr.HEADERS:
            assert self._block is None
            self._block = (f.sid, f.flags, bytearray(f.payload))
        elif f.type == fr.CONTINUATION:
            assert self._block is not None and self._block[0] == f.sid
            self._block[2].extend(f.payload)
        elif f.type == fr.RST_STREAM:
            seen.reset = int.from_bytes(f.payload, "big")
        if f.type in (fr.HEADERS, fr.CONTINUATION) and f.flags & fr.END_HEADERS:
            _, first_flags, block = self._block
            self._block = None
            seen.raw_blocks.append(bytes(block))
            seen.blocks.append([(n, v) for n, v in self.decoder.decode(bytes(block))])
            seen.ended = bool(first_flags & fr.END_STREAM)

    def until(self, predicate) -> list[Frame]:
        """Frames read up to and including the first one for which ``predicate`` is true."""
        frames = []
        while True:
            f = self.read()
            assert f is not None, f"the server closed the connection; frames read: {frames}"
            frames.append(f)
            if predicate(f):
                return frames

    def rest(self) -> list[Frame]:
        """Every frame up to the server closing the connection."""
        frames = []
        while (f := self.read()) is not None:
            frames.append(f)
        return frames

    def ping(self) -> list[Frame]:
        """A PING round trip: the frames the server sent before its ACK (all it had to say
        about what it received before the PING, when nothing runs meanwhile)."""
        self._pings += 1
        payload = b"sync%04d" % self._pings
        self.send(fr.frame(fr.PING, 0, 0, payload))
        frames = self.until(lambda f: f.type == fr.PING and f.payload == payload)
        assert frames[-1].flags == fr.ACK
        return frames[:-1]

    def response(self, sid: int) -> Seen:
        """Read until stream ``sid`` ended or was reset."""
        seen = self.streams[sid]
        if not (seen.ended or seen.reset is not None):
            self.until(lambda f: seen.ended or seen.reset is not None)
        return seen

    def headers(self, sid: int, path: str = UNARY, *, method: str = "POST",
                ctype: str = "application/grpc", extra=(), end_stream: bool = False) -> bytes:
        block = self.encoder.encode([(":method", method), (":scheme", "http"), (":path", path),
                                     (":authority", "test"), ("content-type", ctype),
                                     ("te", "trailers"), *extra])
        flags = fr.END_HEADERS | (fr.END_STREAM if end_stream else 0)
        return fr.frame(fr.HEADERS, flags, sid, block)

    def request(self, sid: int, path: str = UNARY, *messages: bytes, **headers) -> None:
        """One call: HEADERS, then its messages as DATA (16 KiB frames) with END_STREAM."""
        self.send(self.headers(sid, path, **headers), data(sid, grpc_body(*messages)))


def data(sid: int, body: bytes, end_stream: bool = True) -> bytes:
    chunks = [body[i:i + fr.DEFAULT_MAX_FRAME]
              for i in range(0, len(body), fr.DEFAULT_MAX_FRAME)] or [b""]
    return b"".join(fr.frame(fr.DATA, fr.END_STREAM if end_stream and i == len(chunks) - 1
                             else 0, sid, c) for i, c in enumerate(chunks))


def on(frames: list[Frame], sid: int) -> list[Frame]:
    return [f for f in frames if f.sid == sid]


def goaway_of(f: Frame) -> tuple[int, int, bytes]:
    assert f.type == fr.GOAWAY and f.sid == 0
    last, code = struct.unpack_from(">II", f.payload)
    return last, code, f.payload[8:]


@pytest.fixture
def raw(server):
    with RawClient(server.port) as client:
        yield client


def test_server_settings_and_window(raw):
    assert raw.server_settings == {fr.MAX_CONCURRENT_STREAMS: 1024,
                                   fr.INITIAL_WINDOW_SIZE: STREAM_WINDOW, fr.ENABLE_PUSH: 0}
    raw.request(1, UNARY, b"hi")
    seen = raw.response(1)
    assert seen.messages == [b"hi"] and seen.status == 0
    assert seen.blocks == [RESPONSE, [("grpc-status", "0")]]


def test_first_header_block_sets_table_size_zero(raw):
    raw.request(1, UNARY, b"one")
    raw.request(3, FAIL, fail_request(Status.NOT_FOUND, "x"))
    first, second = raw.response(1), raw.response(3)
    assert first.raw_blocks[0][:1] == b"\x20"  # dynamic table size update to 0
    assert all(b[:1] != b"\x20" for b in first.raw_blocks[1:] + second.raw_blocks)
    assert raw.decoder.header_table.maxsize == 0
    assert hpack.Decoder().decode(first.raw_blocks[0]) == RESPONSE
    assert first.blocks == [RESPONSE, [("grpc-status", "0")]]
    assert second.blocks == [RESPONSE + [("grpc-status", "5"), ("grpc-message", "x")]]


def test_bad_preface_goaway_protocol_error(server):
    with RawClient(server.port, handshake=False) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        frames = client.rest()
    assert [f.type for f in frames] == [fr.SETTINGS, fr.WINDOW_UPDATE, fr.GOAWAY]
    last, code, debug = goaway_of(frames[-1])
    assert (last, code) == (0, H2Error.PROTOCOL_ERROR)
    assert b"preface" in debug
    # A partial preface is fine until it diverges.
    with RawClient(server.port, handshake=False) as client:
        client.send(fr.PREFACE[:10])
        client.send(fr.PREFACE[10:] + fr.frame(fr.SETTINGS, 0, 0))
        assert [(f.type, f.flags) for f in client.ping()] == [
            (fr.SETTINGS, 0), (fr.WINDOW_UPDATE, 0), (fr.SETTINGS, fr.ACK)]


def test_non_post_gets_405(raw):
    raw.send(raw.headers(1, UNARY, method="GET", end_stream=True))
    seen = raw.response(1)
    assert seen.blocks == [[(":status", "405")]] and not seen.data
    assert on(raw.ping(), 1) == []  # no RST_STREAM: the client had ended its side


def test_wrong_content_type_gets_415_then_rst(raw):
    raw.send(raw.headers(1, UNARY, ctype="text/plain"))
    seen = raw.response(1)
    assert seen.blocks == [[(":status", "415")]] and not seen.data
    frames = on(raw.until(lambda f: f.type == fr.RST_STREAM), 1)
    assert frames == [Frame(fr.RST_STREAM, 0, 1, struct.pack(">I", H2Error.NO_ERROR))]
    # The client's late DATA on the answered stream is dropped, the connection goes on.
    raw.send(data(1, grpc_body(b"late")))
    raw.request(3, UNARY, b"next")
    assert raw.response(3).messages == [b"next"]


def test_content_type_with_suffix_is_grpc(raw):
    raw.request(1, UNARY, b"proto", ctype="application/grpc+proto")
    assert raw.response(1).messages == [b"proto"]


def trailers_only(seen: Seen) -> tuple[int, str]:
    assert len(seen.blocks) == 1 and seen.blocks[0][:2] == RESPONSE and not seen.data
    return seen.status, seen.message


def test_two_request_messages_internal(raw):
    raw.request(1, UNARY, b"one", b"two")
    assert trailers_only(raw.response(1)) == (
        Status.INTERNAL, "this method takes exactly one request message")


def test_no_request_message_internal(raw):
    raw.send(raw.headers(1, UNARY, end_stream=True))
    assert trailers_only(raw.response(1)) == (
        Status.INTERNAL, "the call carried no request message")
    raw.send(raw.headers(3, UNARY), data(3, b""))
    assert trailers_only(raw.response(3)) == (
        Status.INTERNAL, "the call carried no request message")


def test_truncated_request_message_internal(raw):
    raw.send(raw.headers(1, UNARY), data(1, fr.MESSAGE_PREFIX.pack(0, 10) + b"12345"))
    assert trailers_only(raw.response(1)) == (Status.INTERNAL, "the request message is truncated")


def test_request_in_many_data_frames(raw):
    body = grpc_body(b"abcdefghij" * 100)
    raw.send(raw.headers(1, UNARY),
             *(fr.frame(fr.DATA, 0, 1, body[i:i + 7]) for i in range(0, len(body), 7)),
             fr.frame(fr.DATA, fr.END_STREAM, 1))
    assert raw.response(1).messages == [b"abcdefghij" * 100]


def test_continuation_split_header_block(raw):
    block = raw.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", META),
                                (":authority", "test"), ("content-type", "application/grpc"),
                                ("x-long", "v" * 3000), ("k", "v")])
    a, b = len(block) // 3, 2 * len(block) // 3
    raw.send(fr.frame(fr.HEADERS, 0, 1, block[:a]), fr.frame(fr.CONTINUATION, 0, 1, block[a:b]),
             fr.frame(fr.CONTINUATION, fr.END_HEADERS, 1, block[b:]), data(1, grpc_body(b"")))
    seen = raw.response(1)
    assert seen.status == 0
    metadata = json.loads(seen.messages[0])["metadata"]
    assert metadata == [["x-long", "v" * 3000], ["k", "v"]]
    # END_STREAM on the HEADERS frame counts when the block ends in a CONTINUATION.
    block = raw.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                ("content-type", "application/grpc")])
    raw.send(fr.frame(fr.HEADERS, fr.END_STREAM, 3, block[:4]),
             fr.frame(fr.CONTINUATION, fr.END_HEADERS, 3, block[4:]))
    assert trailers_only(raw.response(3)) == (
        Status.INTERNAL, "the call carried no request message")


def test_ping_answered_with_same_payload(raw):
    raw.send(fr.frame(fr.PING, 0, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    frames = raw.until(lambda f: f.type == fr.PING)
    assert frames[-1] == Frame(fr.PING, fr.ACK, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    raw.send(fr.frame(fr.PING, fr.ACK, 0, b"ignored!"))  # an ACK is not answered
    assert raw.ping() == []


def test_connection_window_update_zero_is_protocol_error(raw):
    raw.send(fr.window_update(0, 0))
    frames = raw.rest()
    assert len(frames) == 1
    assert goaway_of(frames[0])[:2] == (0, H2Error.PROTOCOL_ERROR)


def test_stream_window_update_zero_resets_the_stream(server, probe):
    with RawClient(server.port) as raw:
        raw.request(1, SLOW, b"")
        probe.wait("slow started")
        raw.send(fr.window_update(1, 0))
        assert raw.response(1).reset == H2Error.PROTOCOL_ERROR
        probe.wait("slow cancelled")


def test_frame_over_16384_is_frame_size_error(raw):
    raw.send(raw.headers(1, UNARY), fr.frame(fr.DATA, 0, 1, bytes(16385)))
    frames = raw.rest()
    assert goaway_of(frames[-1])[:2] == (1, H2Error.FRAME_SIZE_ERROR)


def test_data_on_idle_stream_is_protocol_error(raw):
    raw.send(data(5, grpc_body(b"x")))
    frames = raw.rest()
    assert goaway_of(frames[-1])[:2] == (0, H2Error.PROTOCOL_ERROR)


def test_tiny_stream_window_sends_data_as_window_updates_come(server):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 10}) as raw:
        raw.request(1, UNARY, b"m" * 100)  # 105 bytes of response DATA
        frames = raw.until(lambda f: f.type == fr.DATA)
        seen = raw.streams[1]
        assert seen.blocks == [RESPONSE] and seen.sizes == [10]
        assert on(raw.ping(), 1) == []
        raw.send(fr.window_update(1, 50))
        assert [f.type for f in on(raw.ping(), 1)] == [fr.DATA]
        assert seen.sizes == [10, 50] and not seen.ended
        raw.send(fr.window_update(1, 100))
        seen = raw.response(1)
        assert seen.sizes == [10, 50, 45]
        assert seen.messages == [b"m" * 100] and seen.status == 0
        assert frames[0].type == fr.HEADERS


def test_settings_change_of_initial_window_applies_to_open_streams(server):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, UNARY, b"w" * 30)
        raw.until(lambda f: f.type == fr.HEADERS)
        assert on(raw.ping(), 1) == []
        raw.send(fr.frame(fr.SETTINGS, 0, 0, fr.settings_payload({fr.INITIAL_WINDOW_SIZE: 20})))
        frames = raw.ping()
        assert Frame(fr.SETTINGS, fr.ACK, 0, b"") in frames
        assert raw.streams[1].sizes == [20]
        raw.send(fr.frame(fr.SETTINGS, 0, 0, fr.settings_payload({fr.INITIAL_WINDOW_SIZE: 35})))
        seen = raw.response(1)
        assert seen.sizes == [20, 15] and seen.messages == [b"w" * 30]


def test_connection_window_holds_data_back(server):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 1 << 20}) as raw:
        raw.request(1, UNARY, b"c" * 100_000)  # 100,005 bytes back; the window is 65,535
        raw.until(lambda f: f.type == fr.DATA)
        raw.ping()
        seen = raw.streams[1]
        assert sum(seen.sizes) == fr.DEFAULT_WINDOW and not seen.ended
        raw.send(fr.window_update(0, 50_000))
        seen = raw.response(1)
        assert sum(seen.sizes) == 100_005 and seen.messages == [b"c" * 100_000]
        assert max(seen.sizes) == fr.DEFAULT_MAX_FRAME


@pytest.mark.parametrize("max_frame, sizes", [
    (None, [16384] * 6 + [1701]),
    (40_000, [40_000, 40_000, 20_005]),
])
def test_data_frames_within_the_client_max_frame_size(server, max_frame, sizes):
    settings = {fr.INITIAL_WINDOW_SIZE: 1 << 20}
    if max_frame is not None:
        settings[fr.MAX_FRAME_SIZE] = max_frame
    with RawClient(server.port, settings) as raw:
        raw.send(fr.window_update(0, 1 << 20))
        raw.request(1, UNARY, b"f" * 100_000)
        seen = raw.response(1)
        assert seen.sizes == sizes
        assert seen.messages == [b"f" * 100_000]


def test_rst_stream_cancels_the_handler(raw, probe):
    raw.request(1, SLOW, b"")
    probe.wait("slow started")
    raw.send(fr.rst_stream(1, H2Error.CANCEL))
    probe.wait("slow cancelled")
    assert on(raw.ping(), 1) == []
    assert raw.streams[1].blocks == [] and not raw.streams[1].data
    raw.request(3, UNARY, b"after")
    assert raw.response(3).messages == [b"after"]


def test_server_deadline_exceeded_cancels_the_handler(raw, probe):
    start = time.monotonic()
    raw.request(1, SLOW, b"", extra=[("grpc-timeout", "100m")])
    assert trailers_only(raw.response(1)) == (Status.DEADLINE_EXCEEDED, "deadline exceeded")
    assert 0.09 < time.monotonic() - start < 3
    probe.wait("slow cancelled")


def test_deadline_before_the_request_ended(raw, probe):
    raw.send(raw.headers(1, UNARY, extra=[("grpc-timeout", "50m")]))  # no DATA yet
    seen = raw.response(1)
    assert trailers_only(seen) == (Status.DEADLINE_EXCEEDED, "deadline exceeded")
    assert on(raw.until(lambda f: f.type == fr.RST_STREAM), 1)[-1].payload == bytes(4)


def test_malformed_grpc_timeout_internal(raw, probe):
    raw.request(1, SLOW, b"", extra=[("grpc-timeout", "1.5S")])
    assert trailers_only(raw.response(1)) == (Status.INTERNAL, "malformed grpc-timeout '1.5S'")
    raw.request(3, SLOW, b"", extra=[("grpc-timeout", "123456789S")])
    assert raw.response(3).status == Status.INTERNAL
    assert probe.counts["slow started"] == 0


def test_too_many_streams_refused(probe):
    with serving(probe, max_concurrent_streams=2) as s, RawClient(s.port) as raw:
        assert raw.server_settings[fr.MAX_CONCURRENT_STREAMS] == 2
        raw.request(1, SLOW, b"")
        raw.request(3, SLOW, b"")
        raw.request(5, SLOW, b"")
        assert raw.response(5).reset == H2Error.REFUSED_STREAM
        probe.wait("slow started", 2)
        assert raw.streams[5].blocks == []
        raw.send(fr.rst_stream(1, H2Error.CANCEL))
        probe.wait("slow cancelled")
        raw.request(7, UNARY, b"room again")
        assert raw.response(7).messages == [b"room again"]
        assert probe.counts["slow started"] == 2


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_request(raw, encoding, compress):
    payload = b"squeeze " * 1000
    raw.send(raw.headers(1, UNARY, extra=[("grpc-encoding", encoding)]),
             data(1, grpc_body(compress(payload), compressed=True)))
    assert raw.response(1).messages == [payload]
    # The flag decides: an uncompressed message in a gzip call is taken as is.
    raw.request(3, UNARY, b"plain", extra=[("grpc-encoding", encoding)])
    assert raw.response(3).messages == [b"plain"]


def test_compression_errors(raw):
    raw.send(raw.headers(1, UNARY, extra=[("grpc-encoding", "snappy")]),
             data(1, grpc_body(b"x", compressed=True)))
    seen = raw.response(1)
    assert seen.status == Status.UNIMPLEMENTED
    assert seen.fields["grpc-accept-encoding"] == "identity,deflate,gzip"
    raw.send(raw.headers(3, UNARY), data(3, grpc_body(b"x", compressed=True)))
    assert trailers_only(raw.response(3)) == (
        Status.INTERNAL, "a compressed message without grpc-encoding")
    raw.send(raw.headers(5, UNARY, extra=[("grpc-encoding", "gzip")]),
             data(5, grpc_body(b"not gzip at all", compressed=True)))
    status, message = trailers_only(raw.response(5))
    assert status == Status.INTERNAL and message.startswith("cannot decompress the request")


def test_truncated_gzip_request_is_an_error(raw):
    compressed = gzip.compress(b"0123456789" * 1000)
    raw.send(raw.headers(1, UNARY, extra=[("grpc-encoding", "gzip")]),
             data(1, grpc_body(compressed[:len(compressed) // 2], compressed=True)))
    assert raw.response(1).status == Status.INTERNAL


def test_long_status_message_header_frame_within_max_frame_size(raw):
    details = "\u00e9" * 5000
    raw.request(1, FAIL, fail_request(Status.NOT_FOUND, details))
    frames = raw.until(lambda f: raw.streams[1].ended)
    message = raw.streams[1].message
    assert raw.streams[1].status == Status.NOT_FOUND
    assert message and details.startswith(message)
    assert max(len(f.payload) for f in frames) <= fr.DEFAULT_MAX_FRAME


def test_long_status_message_reaches_a_grpc_client(channel):
    details = "\u00e9" * 4096
    e = rpc_error(channel.unary_unary(FAIL), fail_request(Status.NOT_FOUND, details), timeout=5)
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert e.details() and details.startswith(e.details())


def test_write_waits_above_high_water(server, probe):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, STREAM, stream_request(5000, size=100, mode=RETURN_NONE))
        # Nothing can be sent: write() returns while at most HIGH_WATER bytes are held back.
        held = HIGH_WATER // 105  # 105 bytes a framed message
        probe.wait("stream wrote", held)
        assert on(raw.ping(), 1)[0].type == fr.HEADERS
        assert probe.counts["stream wrote"] == held
        raw.send(fr.window_update(0, 1 << 20), fr.window_update(1, 1 << 20))
        seen = raw.response(1)
        assert seen.messages == [item(i, 100) for i in range(5000)] and seen.status == 0
        assert probe.counts["stream wrote"] == 5000


def test_client_reset_while_write_waits(server, probe):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, STREAM, stream_request(3, size=1 << 20))
        raw.until(lambda f: f.type == fr.HEADERS)
        raw.ping()
        assert probe.counts["stream wrote"] == 0  # the first 1 MB message is held back
        raw.send(fr.rst_stream(1, H2Error.CANCEL))
        probe.wait("stream cancelled")
        assert on(raw.ping(), 1) == []


def test_connection_drop_cancels_the_handler(server, probe):
    with RawClient(server.port) as raw:
        raw.request(1, SLOW, b"")
        probe.wait("slow started")
    probe.wait("slow cancelled")
    server.run(wait_until(lambda: not server.server.connections, 2.0, "connection gone"))


def test_padded_and_priority_frames(raw):
    block = raw.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                ("content-type", "application/grpc")])
    headers = bytes([3]) + struct.pack(">IB", 0, 15) + block + b"\0\0\0"
    body = grpc_body(b"padded")
    raw.send(fr.frame(fr.HEADERS, fr.END_HEADERS | fr.PADDED | fr.PRIORITY_FLAG, 1, headers),
             fr.frame(fr.PRIORITY, 0, 1, struct.pack(">IB", 0, 7)),
             fr.frame(0x20, 0xFF, 0, b"an unknown frame type is ignored"),
             fr.frame(fr.DATA, fr.PADDED, 1, bytes([4]) + body[:3] + bytes(4)),
             fr.frame(fr.DATA, fr.PADDED | fr.END_STREAM, 1, bytes([0]) + body[3:]))
    assert raw.response(1).messages == [b"padded"]


def test_request_ended_by_client_trailers(raw):
    raw.send(raw.headers(1, UNARY), data(1, grpc_body(b"with trailers"), end_stream=False),
             fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1,
                      raw.encoder.encode([("x-trailer", "1")])))
    assert raw.response(1).messages == [b"with trailers"]


def _settings(pairs: dict[int, int], flags: int = 0) -> bytes:
    return fr.frame(fr.SETTINGS, flags, 0, fr.settings_payload(pairs))


@pytest.mark.parametrize("frames, code", [
    (fr.frame(fr.PING, 0, 0, b"1234567"), H2Error.FRAME_SIZE_ERROR),
    (fr.frame(fr.PING, 0, 1, b"12345678"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, fr.END_HEADERS, 0, b"\x88"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, fr.END_HEADERS, 2, b"\x83"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, fr.END_HEADERS, 1, b"\xff\xff\xff"), H2Error.COMPRESSION_ERROR),
    (fr.frame(fr.CONTINUATION, fr.END_HEADERS, 1, b"\x83"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, 0, 1, b"\x83") + fr.frame(fr.PING, 0, 0, bytes(8)),
     H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.SETTINGS, 0, 1), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.SETTINGS, 0, 0, bytes(5)), H2Error.FRAME_SIZE_ERROR),
    (fr.frame(fr.SETTINGS, fr.ACK, 0, bytes(6)), H2Error.FRAME_SIZE_ERROR),
    (_settings({fr.INITIAL_WINDOW_SIZE: 2**31}), H2Error.FLOW_CONTROL_ERROR),
    (_settings({fr.MAX_FRAME_SIZE: 16383}), H2Error.PROTOCOL_ERROR),
    (_settings({fr.MAX_FRAME_SIZE: 2**24}), H2Error.PROTOCOL_ERROR),
    (_settings({fr.ENABLE_PUSH: 2}), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.PUSH_PROMISE, fr.END_HEADERS, 1, bytes(4)), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.RST_STREAM, 0, 0, bytes(4)), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.WINDOW_UPDATE, 0, 0, bytes(3)), H2Error.FRAME_SIZE_ERROR),
    (fr.window_update(0, 2**31 - 1), H2Error.FLOW_CONTROL_ERROR),
], ids=["ping-length", "ping-on-stream", "headers-stream-0", "headers-even-stream",
        "bad-hpack", "lone-continuation", "interrupted-block", "settings-on-stream",
        "settings-length", "settings-ack-payload", "window-too-large", "frame-size-small",
        "frame-size-large", "enable-push-2", "push-promise", "rst-stream-0",
        "window-update-length", "connection-window-overflow"])
def test_protocol_errors_end_the_connection(raw, frames, code):
    raw.send(frames)
    rest = raw.rest()
    assert [f.type for f in rest] == [fr.GOAWAY]
    assert goaway_of(rest[0])[1] == code


def test_stream_window_overflow_resets_the_stream(server, probe):
    with RawClient(server.port) as raw:
        raw.request(1, SLOW, b"")
        probe.wait("slow started")
        raw.send(fr.window_update(1, 2**31 - 1))
        assert raw.response(1).reset == H2Error.FLOW_CONTROL_ERROR
        probe.wait("slow cancelled")
        raw.request(3, UNARY, b"still open")
        assert raw.response(3).messages == [b"still open"]


def test_deadline_with_data_held_back_ends_the_stream(server, probe):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, STREAM, stream_request(3, size=1 << 20),
                    extra=[("grpc-timeout", "100m")])
        probe.wait("stream cancelled")
        raw.ping()
        seen = raw.streams[1]
        assert seen.reset is not None or (seen.ended and seen.status == Status.DEADLINE_EXCEEDED)


def test_handler_returning_not_bytes_is_unknown(probe):
    # A raw client, not grpcio: it sends no RST_STREAM at its deadline, so the dead task is
    # only dropped when its server stops, before this thread formats the failure (Python
    # 3.11's traceback formatting calls ast.parse, which is not thread-safe: "SystemError: AST
    # constructor recursion depth mismatch" when both threads format a traceback at once).
    try:
        with serving(probe) as s, RawClient(s.port) as raw:
            raw.request(1, WRONG_RETURN, b"")
            raw.sock.settimeout(1.0)
            seen = raw.response(1)
    finally:
        gc.collect()  # the task's "exception was never retrieved" is logged within this test
    assert (seen.status, seen.data) == (Status.UNKNOWN, b"")


def test_write_of_not_bytes_sends_no_partial_message(raw):
    raw.request(1, WRONG_WRITE, b"")
    seen = raw.response(1)
    assert seen.status == Status.UNKNOWN
    assert seen.data == b""


def test_client_goaway_closes_once_calls_end(raw, probe, server):
    raw.request(1, SLOW, b"")
    probe.wait("slow started")
    raw.send(fr.goaway(0, H2Error.NO_ERROR))
    assert on(raw.ping(), 1) == []  # the call goes on
    raw.send(fr.rst_stream(1, H2Error.CANCEL))
    assert raw.rest() == []


# ---------------------------------------------------------------------- c. start() and stop()


def test_server_arguments_and_binding():
    with pytest.raises(ValueError, match="/package.Service/Method"):
        GrpcServer({"NoSlash": Probe().unary})
    with pytest.raises(ValueError, match="max_receive_message_length"):
        GrpcServer({}, max_receive_message_length=0)
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        GrpcServer({}, max_concurrent_streams=0)

    async def main():
        first = GrpcServer({})
        port = await first.start("127.0.0.1", 0)
        try:
            with pytest.raises(RuntimeError, match="already started"):
                await first.start("127.0.0.1", 0)
            with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
                await GrpcServer({}).start("127.0.0.1", port)
        finally:
            await first.stop()
        shared = [GrpcServer({}), GrpcServer({})]
        assert await shared[1].start("127.0.0.1", await shared[0].start(
            "127.0.0.1", 0, reuse_port=True), reuse_port=True)
        for s in shared:
            await s.stop()
    run_async(main())


# ---------------------------------------------------------------------- stop()


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_stop_grace_lets_running_calls_finish(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        gate = ch.unary_unary(GATE)
        running = gate.future(b"grpc", timeout=10)
        raw.request(1, GATE, b"raw")
        probe.wait("gate entered", 2)
        start = time.monotonic()
        stopping = s.submit(s.stop_and_count(grace_s=5.0))
        last, code, _ = goaway_of(raw.until(lambda f: f.type == fr.GOAWAY)[-1])
        assert (last, code) == (1, H2Error.NO_ERROR)
        assert port_closed(s.port)
        raw.request(3, UNARY, b"too late")
        assert raw.response(3).reset == H2Error.REFUSED_STREAM
        e = rpc_error(ch.unary_unary(UNARY), b"too late", timeout=3)
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert not stopping.done()
        s.release()
        assert running.result(timeout=5) == b"released:grpc"
        assert raw.response(1).messages == [b"released:raw"] and raw.streams[1].status == 0
        assert raw.rest() == []  # closed once its last call ended
        remaining = stopping.result(timeout=5)
        assert time.monotonic() - start < 4.0
        assert remaining == 0


def test_stop_after_grace_ends_calls_unavailable(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        running = ch.unary_unary(SLOW).future(b"", timeout=10)
        raw.request(1, SLOW, b"")
        probe.wait("slow started", 2)
        start = time.monotonic()
        remaining = s.run(s.stop_and_count(grace_s=0.3))
        took = time.monotonic() - start
        assert 0.29 < took < 2.5
        probe.wait("slow cancelled", 2)
        e = running.exception(timeout=5)
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert e.details() == "the server is shutting down"
        seen = raw.response(1)
        assert seen.status == Status.UNAVAILABLE
        assert seen.message == "the server is shutting down"
        raw.rest()
        assert port_closed(s.port)
        assert remaining == 0


def test_stop_closes_idle_connections(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        assert ch.unary_unary(UNARY)(b"warm", timeout=5) == b"warm"
        assert s.connection_count() == 2
        start = time.monotonic()
        s.run(s.server.stop(grace_s=1.0))
        assert time.monotonic() - start < 0.5  # nothing to wait for
        frames = raw.rest()
        assert [goaway_of(f)[:2] for f in frames] == [(0, H2Error.NO_ERROR)]
        assert port_closed(s.port)
        s.run(wait_until(lambda: not s.server.connections, 2.0, "connections closed"))


def test_stop_returns_with_no_connection_left(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        assert ch.unary_unary(UNARY)(b"warm", timeout=5) == b"warm"
        assert raw.ping() == []
        assert s.run(s.stop_and_count(grace_s=1.0)) == 0
