"""ferry.rpc.client.BidiCall against a raw HTTP/2 server (tests/helpers/h2_raw_server.py),
for what a real gRPC server never does: the client's exact preamble; keepalive against a
silent peer and one answering PINGs; resets, GOAWAYs, HTTP statuses, trailers-only statuses, a
lost connection, a failing deserializer; a cancel while connecting; PINGs answered.

Each test runs a *script*: the server's side of its one connection (``Peer``), whose result or
failure the test awaits. Flow control, frame sizes, held writes and responses cut into small
frames: test_h2grpc_bidi_client_flow.py. Real-server tests: test_h2grpc_bidi_client.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ferry.rpc import frames as fr
from ferry.rpc.client import RECV_WINDOW
from ferry.rpc.frames import H2Error
from tests.helpers.h2_client import data, grpc_body
from tests.helpers.h2_raw_server import (
    METHOD,
    OK_ONLY,
    OK_TRAILERS,
    RESPONSE,
    Peer,
    async_test,
    error_of,
    raw_server,
    run,
    status_of,
)


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
