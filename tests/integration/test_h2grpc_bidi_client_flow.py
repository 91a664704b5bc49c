"""ferry.rpc.client.BidiCall against a raw HTTP/2 server (tests/helpers/h2_raw_server.py):
flow control and frames. A DATA frame over the default MAX_FRAME_SIZE answered with a GOAWAY;
the server's INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE honoured (and write() held back past
HIGH_WATER, woken by a cancel or a reset); responses cut into one-byte, padded and
CONTINUATION frames.

Each test runs a *script*: the server's side of its one connection (``Peer``), whose result or
failure the test awaits. Preamble, keepalive and statuses: test_h2grpc_bidi_client_wire.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ferry.rpc import frames as fr
from ferry.rpc.client import HIGH_WATER
from ferry.rpc.frames import H2Error
from tests.helpers.h2_client import grpc_body
from tests.helpers.h2_raw_server import (
    OK_ONLY,
    RESPONSE,
    Peer,
    async_test,
    error_of,
    raw_server,
    run,
)


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
