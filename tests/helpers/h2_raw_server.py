"""A raw HTTP/2 server for the ferry.rpc.client.BidiCall tests: asyncio TCP on 127.0.0.1,
port 0, frames read and written by hand, for what a real gRPC server never does.

- ``raw_server(script, ...)``: a server whose first connection runs ``script(peer)``; yields
  (call, outcome): a BidiCall to it and a future of the script's result (a failed assertion of
  the script fails the test).
- ``Peer``: the server's side of one connection (``open``, ``frame``, ``until``, ``rest``,
  ``ping``, ``body``); every read has a timeout.
- ``error_of`` / ``status_of``: the AioRpcError a read ends with. ``run`` / ``async_test``:
  coroutines run as sync tests, with a timeout.
- ``METHOD``, ``RESPONSE`` (response HEADERS on stream 1), ``OK_TRAILERS``, ``OK_ONLY``
  (trailers-only status 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

import grpc
import hpack
import pytest

from ferry.rpc import frames as fr
from ferry.rpc.client import BidiCall
from tests.helpers.h2_client import Frame

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
