"""The puller's end of ``KvTransfer.PullBlocks`` on a plain HTTP/2 connection of its own,
read into one buffer from which each chunk is checked and written into the destination
blocks without being copied first (grpc.aio copies every received message into a ``bytes``
on its poller thread, then hands it to the event loop: most of a pull's CPU).

Protocol (a gRPC unary-stream call, h2c with prior knowledge, as any gRPC server takes it):
the preface, SETTINGS (no push, INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE at their maxima, so a
holder sends each chunk as one DATA frame), a connection WINDOW_UPDATE to the maximum, the
call's HEADERS and its one request message with END_STREAM. Received frames are parsed in
place (``asyncio.BufferedProtocol``: the socket is read straight into the buffer); a DATA
frame's complete messages go to ``on_message(memoryview)`` at once, on the event loop,
before the buffer is reused; a message spread over several frames is gathered first. DATA is
credited back when half a window is used; SETTINGS are acknowledged and PINGs answered. The
call ends with the trailers' ``grpc-status`` (OK: the stream is complete), a RST_STREAM, a
GOAWAY with an error, the connection closing, or ``on_message`` raising; the connection is
then closed, so nothing is delivered after :func:`pull_stream` returned or raised.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import hpack

from ferry.rpc import frames as fr
from ferry.rpc.hpack_cache import BlockDecoder

BUFFER_BYTES = 32 << 20
_buffers: list[bytearray] = []  # receive buffers of finished pulls
MAX_FRAME = fr.MAX_FRAME_LIMIT
_SID = 1
_CREDIT = 1 << 30  # send a WINDOW_UPDATE once this much was received


class RpcStatus(Exception):
    """The call ended with a gRPC status other than OK (``code`` is its name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code, self.message = code, message


class _PullProtocol(asyncio.BufferedProtocol):
    def __init__(self, authority: str, path: str, request: bytes,
                 on_message: Callable[[memoryview], None]) -> None:
        settings = fr.settings_payload({fr.ENABLE_PUSH: 0, fr.INITIAL_WINDOW_SIZE: fr.MAX_WINDOW,
                                        fr.MAX_FRAME_SIZE: MAX_FRAME})
        self._opening = (fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0, settings)
                         + fr.window_update(0, fr.MAX_WINDOW - fr.DEFAULT_WINDOW)
                         + fr.frame(fr.HEADERS, fr.END_HEADERS, _SID,
                                    fr.request_headers(authority, path))
                         + fr.frame(fr.DATA, fr.END_STREAM, _SID,
                                    fr.MESSAGE_PREFIX.pack(0, len(request)) + request))
        self._on_message = on_message
        self._buf = _buffers.pop() if _buffers else bytearray(BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._partial = bytearray()  # a message spread over frames
        self._credit = 0
        self._paused = False
        self._headers: bytearray | None = None
        self._headers_end = False
        self._decoder = BlockDecoder(1 << 20)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        fr.set_nodelay(transport)
        transport.write(self._opening)

    def connection_lost(self, exc) -> None:
        self._finish(RpcStatus("UNAVAILABLE", f"the connection was lost ({exc or 'closed'})"))

    def _finish(self, outcome: BaseException | None) -> None:
        if not self.done.done():
            if outcome is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(outcome)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        if BUFFER_BYTES - self._end < (1 << 20):  # move the unparsed rest to the front
            n = self._end - self._start
            self._buf[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._step()

    def _step(self) -> None:
        """Parse what the buffer holds, one DATA frame's messages per loop turn: between two,
        reading pauses and other tasks run (a pull stays cancellable and the loop responsive);
        the buffer is not refilled meanwhile, so the views handed out stay valid."""
        if self.done.done():
            return
        try:
            more = self._parse()
        except BaseException as exc:  # noqa: BLE001 - on_message's error ends the pull
            self._finish(exc)
            return
        if more and not self.done.done():
            if not self._paused:
                self.transport.pause_reading()
                self._paused = True
            asyncio.get_running_loop().call_soon(self._step)
        elif self._paused and not self.done.done():
            self._paused = False
            self.transport.resume_reading()

    def _parse(self) -> bool:
        """Handle the buffer's complete frames; True when it stopped after a DATA frame's
        messages with more complete frames left."""
        view, pos, end = self._view, self._start, self._end
        while end - pos >= 9 and not self.done.done():
            lt, flags, sid = fr.FRAME_HEADER.unpack_from(self._buf, pos)
            length, ftype = lt >> 8, lt & 0xFF
            if length > MAX_FRAME:
                raise RpcStatus("INTERNAL", f"a frame of {length} bytes")
            if end - pos - 9 < length:
                break
            start, pos = pos + 9, pos + 9 + length
            sid &= 0x7FFFFFFF
            if ftype == fr.DATA:
                self._credit += length
                got = 0
                if sid == _SID:
                    if flags & fr.PADDED and length:
                        got = self._messages(view[start + 1:pos - view[start]])
                    else:
                        got = self._messages(view[start:pos])
                if self._credit >= _CREDIT:
                    self.transport.write(fr.window_update(0, self._credit)
                                         + fr.window_update(_SID, self._credit))
                    self._credit = 0
                if got and end - pos >= 9:
                    self._start = pos
                    return True
            elif ftype in (fr.HEADERS, fr.CONTINUATION) and sid == _SID:
                self._on_headers(ftype, flags, bytes(view[start:pos]))
            elif ftype == fr.SETTINGS and not flags & fr.ACK:
                self.transport.write(fr.frame(fr.SETTINGS, fr.ACK, 0))
            elif ftype == fr.PING and not flags & fr.ACK:
                self.transport.write(fr.frame(fr.PING, fr.ACK, 0, bytes(view[start:pos])))
            elif ftype == fr.RST_STREAM and sid == _SID:
                code = int.from_bytes(view[start:start + 4], "big")
                self._finish(RpcStatus(fr.reset_status(code).name,
                                       f"the holder reset the stream ({code})"))
            elif ftype == fr.GOAWAY and length >= 8:
                last, code = struct.unpack_from(">II", self._buf, start)
                if (last & 0x7FFFFFFF) < _SID or code:
                    self._finish(RpcStatus("UNAVAILABLE", f"GOAWAY from the holder ({code})"))
        self._start = pos
        if pos == end:
            self._start = self._end = 0
        return False

    def _messages(self, data: memoryview) -> int:
        if self._partial:
            self._partial += data
            data = memoryview(bytes(self._partial))
            self._partial = bytearray()
        pos, n, got = 0, len(data), 0
        while n - pos >= 5:
            compressed, size = fr.MESSAGE_PREFIX.unpack_from(data, pos)
            if compressed:
                raise RpcStatus("INTERNAL", "the holder sent a compressed message")
            if n - pos - 5 < size:
                break
            self._on_message(data[pos + 5:pos + 5 + size])
            pos += 5 + size
            got += 1
        if pos < n:
            self._partial += data[pos:]
        return got

    def _on_headers(self, ftype: int, flags: int, payload: bytes) -> None:
        try:
            if ftype == fr.HEADERS:
                self._headers = bytearray(fr.header_fragment(flags, payload))
                self._headers_end = bool(flags & fr.END_STREAM)
            elif self._headers is not None:
                self._headers += payload
            if not flags & fr.END_HEADERS or self._headers is None:
                return
            headers = dict(self._decoder.decode(bytes(self._headers)))
        except (ValueError, hpack.HPACKError) as e:
            raise RpcStatus("INTERNAL", f"a bad header block from the holder: {e}") from None
        self._headers = None
        status = headers.get(":status")
        if status is not None and status != "200":
            raise RpcStatus(fr.http_status(status).name, f"the holder answered HTTP {status}")
        if self._headers_end:
            code, message = fr.call_status(headers)
            self._finish(None if code == fr.Status.OK else RpcStatus(code.name, message))

    def close(self) -> None:
        if not self.done.done():
            self.done.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self._buf is not None and len(_buffers) < 2:  # reused: allocating zeroes it
            _buffers.append(self._buf)
        self._buf = None


async def pull_stream(address: str, path: str, request: bytes,
                      on_message: Callable[[memoryview], None]) -> None:
    """One unary-stream call to ``address`` (host:port); each response message goes to
    ``on_message`` (a view valid only during the call). Returns when the call ended OK;
    raises RpcStatus, OSError (cannot connect) or what ``on_message`` raised."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    protocol = _PullProtocol(address, path, request, on_message)
    try:
        await loop.create_connection(lambda: protocol, host.strip("[]"), int(port))
        await protocol.done
    finally:
        protocol.close()


__all__ = ["BUFFER_BYTES", "RpcStatus", "pull_stream"]
