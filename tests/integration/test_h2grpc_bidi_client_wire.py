"""ferry.rpc.client.BidiCall against a raw HTTP/2 server written here (asyncio TCP on
127.0.0.1, port 0, frames read and written by hand), for what a real gRPC server never does:
the client's exact preamble; keepalive against a silent peer and one answering PINGs; resets,
GOAWAYs, HTTP statuses, trailers-only statuses, a lost connection, protocol errors; the
server's INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE honoured (and write() held back past
HIGH_WATER); PINGs answered; responses cut into one-byte, padded and CONTINUATION frames.

Each test runs a *script*: the server's side of its one connection (``Peer``), whose result or
failure the test awaits. Real-server tests: test_h2grpc_bidi_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc
import hpack
import pytest

from ferry.rpc import frames as fr
from ferry.rpc.client import HIGH_WATER, RECV_WINDOW, BidiCall
from ferry.rpc.frames import H2Error
from tests.helpers.h2_client import Frame, data, grpc_body

METHOD = "/test.Bidi/Echo"
RESPONSE = fr.frame(fr.HEADERS, fr.END_HEADERS, 1, fr.response_headers())
OK_TRAILERS = fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1, fr.trailers(0))
OK_ONLY = fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1, fr.trailers_only(0))


def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def async_test(fn):
    """A sync test running the coroutine function ``fn`` (its parameters kept for pytest)."""
    @functools.wraps(fn)
    def test(*args, **kwargs):
        return run(fn(*args, **kwargs))
    return test


class Peer:
    """The server's side of one connection; every read has a timeout."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = hpack.Decoder()
        self._pings = 0

    def send(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))

    async def frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame; None once the client closed the connection."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        except asyncio.IncompleteReadError as e:
            assert not e.partial, f"the connection closed inside a frame: {e.partial!r}"
            return None
        length_type, flags, sid = fr.FRAME_HEADER.unpack(head)
        payload = await asyncio.wait_for(self.reader.readexactly(length_type >> 8), timeout)
        return Frame(length_type & 0xFF, flags, sid & 0x7FFFFFFF, payload)

    async def until(self, predicate) -> list[Frame]:
        frames = []
        while True:
            f = await self.frame()
            assert f is not None, f"the client closed the connection; frames read: {frames}"
            frames.append(f)
            if predicate(f):
                return frames

    async def rest(self) -> list[Frame]:
        """Every frame until the client closes the connection."""
        frames = []
        while (f := await self.frame()) is not None:
            frames.append(f)
        return frames

    async def open(self, settings: dict[int, int] | None = None,
                   extra: bytes = b"") -> list[Frame]:
        """Read the preface, send SETTINGS (and ``extra``); the frames up to the call's HEADERS
        and the ACK of those SETTINGS, both seen."""
        assert await asyncio.wait_for(self.reader.readexactly(24), 5) == fr.PREFACE
        self.send(fr.frame(fr.SETTINGS, 0, 0, fr.settings_payload(settings or {})), extra)
        frames, seen = [], set()
        while len(seen) < 2:
            f = await self.frame()
            assert f is not None, f"the client closed the connection; frames read: {frames}"
            frames.append(f)
            if f.type == fr.HEADERS or (f.type == fr.SETTINGS and f.flags & fr.ACK):
                seen.add(f.type)
        return frames

    async def ping(self) -> list[Frame]:
        """A PING round trip: the frames the client sent before its ACK."""
        self._pings += 1
        payload = b"sync%04d" % self._pings
        self.send(fr.frame(fr.PING, 0, 0, payload))
        frames = await self.until(lambda f: f.type == fr.PING and f.payload == payload)
        assert frames[-1].flags == fr.ACK
        return frames[:-1]

    async def body(self, size: int) -> tuple[bytes, list[int]]:
        """DATA on stream 1 until ``size`` bytes came: the bytes and the frame sizes."""
        got, sizes = bytearray(), []
        while len(got) < size:
            f = (await self.until(lambda f: f.type == fr.DATA))[-1]
            assert f.sid == 1 and not f.flags & fr.END_STREAM
            got += f.payload
            sizes.append(len(f.payload))
        assert len(got) == size
        return bytes(got), sizes


@contextlib.asynccontextmanager
async def raw_server(script, deserializer=bytes, **call_kw):
    """A TCP server whose first connection runs ``script(peer)``; yields (call, outcome): a
    BidiCall to it and a future of the script's result (a failed assertion of the script
    fails the test)."""
    outcome = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        try:
            if not outcome.done():
                outcome.set_result(await script(Peer(reader, writer)))
        except BaseException as e:  # noqa: BLE001 - handed to the test, which raises it
            if not outcome.done():
                outcome.set_exception(e)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        call = BidiCall(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", METHOD, bytes,
                        deserializer, **call_kw)
        yield call, outcome
    finally:
        call.cancel()  # closes its connection, if still open
        server.close()
        if not outcome.done():
            outcome.cancel()
        elif not outcome.cancelled() and outcome.exception() is not None:
            raise outcome.exception()  # the script's failure: the cause of the test's


async def error_of(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(awaitable, 5)
    return info.value


async def status_of(script, **call_kw) -> grpc.aio.AioRpcError:
    """The error of a call whose server runs ``script``; the script's result is checked."""
    async with raw_server(script, **call_kw) as (call, outcome):
        e = await error_of(call.read())
        await asyncio.wait_for(outcome, 5)
        return e


@async_test
async def test_preamble_messages_and_an_ok_end_after_a_graceful_goaway():
    async def script(peer: Peer):
        first = await peer.open()
        assert [f[:3] for f in first[:3]] == [(fr.SETTINGS, 0, 0), (fr.WINDOW_UPDATE, 0, 0),
                                              (fr.HEADERS, fr.END_HEADERS, 1)]
        assert fr.parse_settings(first[0].payload) == [(fr.ENABLE_PUSH, 0),
                                                        (fr.INITIAL_WINDOW_SIZE, RECV_WINDOW)]
        assert int.from_bytes(first[1].payload, "big") == RECV_WINDOW - fr.DEFAULT_WINDOW
        port = peer.writer.get_extra_info("sockname")[1]
        assert peer.decoder.decode(first[2].payload) == [
            (":method", "POST"), (":scheme", "http"), (":path", METHOD),
            (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
            ("te", "trailers")]
        frames = [f for f in first[3:] if f.type != fr.SETTINGS]  # DATA may come before
        if not (frames and frames[-1].flags & fr.END_STREAM):    # the ACK of SETTINGS
            frames += await peer.until(lambda f: f.flags & fr.END_STREAM)
        assert all(f.type == fr.DATA and f.sid == 1 for f in frames)
        assert b"".join(f.payload for f in frames) == grpc_body(b"hello", b"")
        assert frames[-1].payload == b""
        peer.send(fr.goaway(1, H2Error.NO_ERROR),  # graceful: the call may finish
                  RESPONSE, data(1, grpc_body(b"hi", b"", b"there"), end_stream=False),
                  OK_TRAILERS)
        return await peer.rest()

    async with raw_server(script) as (call, outcome):
        await call.write(b"hello")
        await call.write(b"")
        await call.done_writing()
        assert [await call.read() for _ in range(3)] == [b"hi", b"", b"there"]
        assert await call.read() is grpc.aio.EOF
        assert await asyncio.wait_for(outcome, 5) == []  # closed, nothing more sent


@async_test
async def test_keepalive_unanswered_ends_the_call_unavailable():
    async def script(peer: Peer):
        await peer.open()
        return await peer.rest()  # answers nothing

    async with raw_server(script, keepalive_s=0.2, keepalive_timeout_s=0.2) as (call, outcome):
        start = time.monotonic()
        e = await error_of(call.read())
        took = time.monotonic() - start
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "keepalive" in e.details()
        assert 0.35 < took < 1.0, took
        pings = [f for f in await asyncio.wait_for(outcome, 5) if f.type == fr.PING]
        assert [(f.flags, len(f.payload)) for f in pings] == [(0, 8)]


@async_test
async def test_keepalive_answered_keeps_the_call_open():
    async def script(peer: Peer):
        await peer.open()
        frames = []
        while (f := await peer.frame()) is not None:
            frames.append(f)
            if f.type == fr.PING and not f.flags & fr.ACK:
                peer.send(fr.frame(fr.PING, fr.ACK, 0, f.payload))
        return frames

    async with raw_server(script, keepalive_s=0.2, keepalive_timeout_s=0.2) as (call, outcome):
        reading = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({reading}, timeout=1.0)
        assert not done and not call.done()
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        frames = await asyncio.wait_for(outcome, 5)
        assert sum(f.type == fr.PING for f in frames) >= 2  # one per ~0.2 s
        assert frames[-1] == (fr.RST_STREAM, 0, 1, H2Error.CANCEL.to_bytes(4, "big"))


@pytest.mark.parametrize("h2_code,code", [
    (H2Error.CANCEL, grpc.StatusCode.CANCELLED),
    (H2Error.REFUSED_STREAM, grpc.StatusCode.UNAVAILABLE),
    (H2Error.INTERNAL_ERROR, grpc.StatusCode.INTERNAL),
])
@async_test
async def test_rst_stream_after_a_message(h2_code, code):
    async def script(peer: Peer):
        await peer.open()
        peer.send(RESPONSE, data(1, grpc_body(b"first"), end_stream=False),
                  fr.rst_stream(1, h2_code))
        return await peer.rest()

    async with raw_server(script) as (call, outcome):
        assert await call.read() == b"first"
        assert (await error_of(call.read())).code() == code
        assert await asyncio.wait_for(outcome, 5) == []


@pytest.mark.parametrize("block,code,details", [
    (fr.http_status_only(404), grpc.StatusCode.UNIMPLEMENTED, "the server answered HTTP 404"),
    (fr.http_status_only(500), grpc.StatusCode.UNKNOWN, "the server answered HTTP 500"),
    (fr.http_status_only(503), grpc.StatusCode.UNAVAILABLE, "the server answered HTTP 503"),
    (fr.http_status_only(401), grpc.StatusCode.UNAUTHENTICATED, "the server answered HTTP 401"),
    (fr.trailers_only(5, "nope \u00e9 100%"), grpc.StatusCode.NOT_FOUND, "nope \u00e9 100%"),
    (fr.response_headers(), grpc.StatusCode.UNKNOWN, "the call ended without grpc-status"),
])
def test_one_header_block_ending_the_call(block, code, details):
    assert b"%C3%A9" in fr.trailers_only(5, "\u00e9")  # sent percent-encoded

    async def script(peer: Peer):
        await peer.open()
        peer.send(fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1, block))
        return await peer.rest()
    e = run(status_of(script))
    assert (e.code(), e.details()) == (code, details)


@pytest.mark.parametrize("ending,code,words", [
    (fr.goaway(0, H2Error.NO_ERROR), grpc.StatusCode.UNAVAILABLE, "GOAWAY 0"),
    (fr.goaway(1, H2Error.ENHANCE_YOUR_CALM, b"calm"), grpc.StatusCode.UNAVAILABLE, "calm"),
    (b"", grpc.StatusCode.UNAVAILABLE, "was lost"),  # the server closes the connection
    (RESPONSE + fr.frame(fr.DATA, fr.END_STREAM, 1), grpc.StatusCode.INTERNAL, "status"),
    (RESPONSE + data(1, grpc_body(b"z", compressed=True)), grpc.StatusCode.INTERNAL,
     "compressed"),
])
def test_call_ended_by_the_connection(ending, code, words):
    async def script(peer: Peer):
        await peer.open()
        peer.send(ending)
        return [] if not ending else await peer.rest()
    e = run(status_of(script))
    assert e.code() == code and words in e.details(), e


@async_test
async def test_frame_too_large_answered_with_goaway_frame_size_error():
    async def script(peer: Peer):
        await peer.open()
        peer.send(RESPONSE, fr.frame(fr.DATA, 0, 1, bytes(fr.DEFAULT_MAX_FRAME + 1)))
        return await peer.rest()

    async with raw_server(script) as (call, outcome):
        e = await error_of(call.read())
        assert e.code() == grpc.StatusCode.INTERNAL and "16385 bytes" in e.details()
        (f,) = await asyncio.wait_for(outcome, 5)
        assert (f.type, f.payload[:8]) == (fr.GOAWAY, bytes(4) + bytes([0, 0, 0, 6]))


@async_test
async def test_failing_deserializer_ends_the_call_after_the_good_messages():
    def parse(b: bytes) -> bytes:
        if b == b"bad":
            raise ValueError("cannot parse it")
        return b

    async def script(peer: Peer):
        await peer.open()
        peer.send(RESPONSE, data(1, grpc_body(b"good"), end_stream=False))
        await peer.ping()
        peer.send(data(1, grpc_body(b"bad"), end_stream=False))
        return await peer.rest()

    async with raw_server(script, parse) as (call, outcome):
        assert await call.read() == b"good"
        e = await error_of(call.read())
        assert e.code() == grpc.StatusCode.INTERNAL
        assert e.details() == "cannot parse a response message: cannot parse it"
        await asyncio.wait_for(outcome, 5)


@async_test
async def test_initial_window_size_10_and_write_held_back_past_high_water():
    ready, first_written, second_started = asyncio.Event(), asyncio.Event(), asyncio.Event()
    small, big = b"s" * 100, bytes(range(256)) * 1200  # 300 KiB: over HIGH_WATER
    assert len(big) > HIGH_WATER

    async def script(peer: Peer):
        await peer.open({fr.INITIAL_WINDOW_SIZE: 10})
        ready.set()
        await first_written.wait()
        sent = await peer.ping()
        assert [(f.type, f.sid, f.flags) for f in sent] == [(fr.DATA, 1, 0)]
        assert sum(len(f.payload) for f in sent) == 10  # exactly the window
        await second_started.wait()
        assert await peer.ping() == []  # nothing more without a WINDOW_UPDATE
        peer.send(fr.window_update(1, 1 << 20), fr.window_update(0, 1 << 20))
        rest, sizes = await peer.body(len(grpc_body(small, big)) - 10)
        assert max(sizes) == fr.DEFAULT_MAX_FRAME
        assert sent[0].payload + rest == grpc_body(small, big)
        assert (await peer.frame())[:4] == (fr.DATA, fr.END_STREAM, 1, b"")
        peer.send(OK_ONLY)
        return await peer.rest()

    async with raw_server(script) as (call, outcome):
        reading = asyncio.ensure_future(call.read())  # connects
        await asyncio.wait_for(ready.wait(), 5)
        await call.write(small)  # held back: returns
        first_written.set()
        writing = asyncio.ensure_future(call.write(big))
        done, _ = await asyncio.wait({writing}, timeout=0.1)
        assert not done  # more than HIGH_WATER held
        second_started.set()
        await asyncio.wait_for(writing, 5)
        await call.done_writing()
        assert await asyncio.wait_for(reading, 5) is grpc.aio.EOF
        await asyncio.wait_for(outcome, 5)


@pytest.mark.parametrize("settings,sizes", [
    ({fr.MAX_FRAME_SIZE: 20_000, fr.INITIAL_WINDOW_SIZE: 1 << 20}, [20_000] * 3 + [10_005]),
    ({}, [16_384] * 3 + [16_383]),  # the default windows (65,535) and frames: then WINDOW_UPDATE
])
@async_test
async def test_max_frame_size_and_windows(settings, sizes):
    ready = asyncio.Event()
    message = bytes(range(250)) * 280  # 70,000 bytes

    async def script(peer: Peer):
        extra = fr.window_update(0, 1 << 20) if settings else b""
        await peer.open(settings, extra)
        ready.set()
        got, seen = await peer.body(sum(sizes))
        assert seen == sizes
        if not settings:
            assert await peer.ping() == []  # no END_STREAM before the data held back
            peer.send(fr.window_update(1, 10_000))
            assert await peer.ping() == []  # the connection's window is still 0
            peer.send(fr.window_update(0, 4470))
            more, seen = await peer.body(4470)
            assert seen == [4470]
            got += more
        assert got == grpc_body(message)
        assert (await peer.frame())[:4] == (fr.DATA, fr.END_STREAM, 1, b"")
        return await peer.ping()

    async with raw_server(script) as (call, outcome):
        reading = asyncio.ensure_future(call.read())
        await asyncio.wait_for(ready.wait(), 5)
        await call.write(message)
        await call.done_writing()
        assert await asyncio.wait_for(outcome, 5) == []
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading


@async_test
async def test_cancel_while_connecting():
    async def script(peer: Peer):
        return await peer.reader.read()

    async with raw_server(script) as (call, _):
        reading = asyncio.ensure_future(call.read())
        await asyncio.sleep(0)  # the read started connecting
        assert call.cancel() and call.done()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(reading, 5)
        with pytest.raises(asyncio.CancelledError):
            await call.write(b"x")


async def _held_write(ending):
    """A write held back (window 0, more than HIGH_WATER) when ``ending(call, peer)`` ends
    the call: what the write does then."""
    ready, held = asyncio.Event(), asyncio.Event()

    async def script(peer: Peer):
        await peer.open({fr.INITIAL_WINDOW_SIZE: 0})
        ready.set()
        await held.wait()
        ending(call, peer)
        return await peer.rest()

    async with raw_server(script) as (call, outcome):
        reading = asyncio.ensure_future(call.read())
        await asyncio.wait_for(ready.wait(), 5)
        writing = asyncio.ensure_future(call.write(bytes(HIGH_WATER + 1)))
        done, _ = await asyncio.wait({writing}, timeout=0.1)
        assert not done
        held.set()
        await asyncio.wait({reading}, timeout=5)
        await asyncio.wait_for(outcome, 5)
        return await asyncio.wait_for(writing, 5)


def test_cancel_wakes_a_write_held_back():
    with pytest.raises(asyncio.CancelledError):
        run(_held_write(lambda call, peer: call.cancel()))


def test_a_write_held_back_when_the_server_resets_raises_its_error():
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(_held_write(lambda call, peer: peer.send(fr.rst_stream(1, H2Error.REFUSED_STREAM))))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@async_test
async def test_server_ping_acked_with_its_payload_and_acks_not_answered():
    async def script(peer: Peer):
        await peer.open()
        peer.send(fr.frame(fr.PING, fr.ACK, 0, b"unasked!"),
                  fr.frame(fr.PING, 0, 0, b"\x00\x01srv\xff\xfe\x07"))
        f = (await peer.until(lambda f: f.type == fr.PING))[-1]
        assert f == (fr.PING, fr.ACK, 0, b"\x00\x01srv\xff\xfe\x07")
        assert await peer.ping() == []
        peer.send(OK_ONLY)
        return await peer.rest()

    async with raw_server(script) as (call, outcome):
        assert await call.read() is grpc.aio.EOF
        assert await asyncio.wait_for(outcome, 5) == []


def _one_byte(body: bytes) -> bytes:
    return b"".join(fr.frame(fr.DATA, 0, 1, body[i:i + 1]) for i in range(len(body)))


def _padded(body: bytes) -> bytes:
    return b"".join(fr.frame(fr.DATA, fr.PADDED, 1, b"\x03" + body[i:i + 7] + b"\0\0\0")
                    for i in range(0, len(body), 7))


@pytest.mark.parametrize("cut", [_one_byte, _padded])
@async_test
async def test_response_cut_into_small_frames_reassembled(cut):
    messages = [b"hello", b"", bytes(range(256)) * 3, b"x"]
    headers = fr.response_headers()
    trailer_block = fr.trailers(0)

    async def script(peer: Peer):
        await peer.open()
        peer.send(  # headers PADDED and with PRIORITY; trailers in HEADERS + CONTINUATION
            fr.frame(fr.HEADERS, fr.END_HEADERS | fr.PADDED | fr.PRIORITY_FLAG, 1,
                     b"\x02" + bytes(5) + headers + b"\0\0"),
            cut(grpc_body(*messages)),
            fr.frame(fr.HEADERS, fr.END_STREAM, 1, trailer_block[:3]),
            fr.frame(fr.CONTINUATION, fr.END_HEADERS, 1, trailer_block[3:]))
        return await peer.rest()

    async with raw_server(script) as (call, outcome):
        got = [await call.read() for _ in messages]
        assert got == messages
        assert await call.read() is grpc.aio.EOF
        await asyncio.wait_for(outcome, 5)
