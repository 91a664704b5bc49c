"""Cheap streaming clients for the serving benchmark: OpenAI SSE over HTTP/1.1 and ferry.v1
``Ferry.Generate`` over HTTP/2 (gRPC), each on a bare asyncio protocol.

The load generator shares the machine's cores with the servers it measures, so its own cost
per request must be small: aiohttp's client costs about 1 ms of CPU per streamed request and
grpc.aio's 1.5 ms, these about a tenth of that. They are still real clients: each request is
sent on the wire, and its whole streamed response is read, framed and checked.

HTTP (:class:`SseConnection`): one keep-alive HTTP/1.1 connection; ``await request()`` sends
one POST and reads the response to its end: headers, then a ``Transfer-Encoding: chunked``
body (or a ``Content-Length`` one, which is how errors come). The chunked framing is decoded
and checked; the result is the body (the SSE events).

gRPC (:class:`GrpcConnection`): one HTTP/2 connection (h2c, prior knowledge) carrying many
concurrent streams. Client side of the protocol as implemented here:

- preface, then SETTINGS (no push; stream window 2**31-1) and a connection WINDOW_UPDATE up
  to 2**31-1; the connection window is topped up again every 16 MiB received;
- a call is HEADERS (``:method POST``, ``:path /ferry.v1.Ferry/Generate``, ``content-type
  application/grpc``, ``te trailers``; HPACK literals without indexing, so no encoder state)
  then one DATA frame with END_STREAM holding the length-prefixed request message;
- the server's SETTINGS are acknowledged and its PINGs answered; header blocks it sends are
  not decoded (the outcome is read from the messages: client.proto puts every outcome,
  errors included, in the stream's last message); a stream ends with END_STREAM (trailers);
  RST_STREAM fails that call, GOAWAY or a lost connection fails every call on it.

The result of a call is the list of its response messages (bytes, the gRPC length prefix
removed), in order.
"""

from __future__ import annotations

import asyncio
import struct

# ---------------------------------------------------------------------- HTTP/1.1 + SSE


class HttpError(RuntimeError):
    pass


class SseConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future | None = None
        self._head_end = -1
        self._length: int | None = -1  # Content-Length, -1: chunked
        self.lost: BaseException | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> SseConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.lost = exc or ConnectionResetError("the server closed the connection")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.lost)

    async def request(self, raw_request: bytes) -> tuple[int, bytes]:
        """Send a complete request; return (status, decoded body) once the response ended."""
        if self.lost is not None:
            raise self.lost
        self._buf.clear()
        self._head_end = -1
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw_request)
        try:
            return await waiter
        finally:
            self._waiter = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head_end = end + 4
            self._length = _body_length(bytes(buf[:end]))
            if self._length is None:
                self._finish(HttpError(f"no body length in response head {bytes(buf[:200])!r}"))
                return
        if self._length >= 0:
            if len(buf) - self._head_end >= self._length:
                self._finish(None)
        elif buf.endswith(b"\r\n0\r\n\r\n") or (len(buf) == self._head_end + 5
                                                and buf.endswith(b"0\r\n\r\n")):
            self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
            return
        buf = self._buf
        try:
            status = int(buf[9:12])
            body = bytes(buf[self._head_end:]) if self._length >= 0 else \
                dechunk(buf, self._head_end)
        except (ValueError, HttpError) as e:
            waiter.set_exception(HttpError(f"bad response: {e}"))
            return
        waiter.set_result((status, body))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _body_length(head: bytes) -> int | None:
    """-1 for a chunked body, else its Content-Length (None: neither is given)."""
    for line in head.lower().split(b"\r\n")[1:]:
        if line == b"transfer-encoding: chunked":
            return -1
        if line.startswith(b"content-length:"):
            return int(line[15:])
    return None


def dechunk(buf: bytes | bytearray, start: int) -> bytes:
    """The payload of a complete chunked body starting at ``buf[start]``; checks framing."""
    parts = []
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise HttpError("chunk size line without CRLF")
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            if buf[pos:pos + 2] != b"\r\n":
                raise HttpError("last chunk without its CRLF")
            return b"".join(parts)
        parts.append(bytes(buf[pos:pos + size]))
        pos += size
        if buf[pos:pos + 2] != b"\r\n":
            raise HttpError("chunk data without its CRLF")
        pos += 2


def http_post(host: str, port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


# ---------------------------------------------------------------------- HTTP/2 + gRPC

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY, _WINDOW, _CONT = 0, 1, 3, 4, 6, 7, 8, 9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_MAX_WINDOW = 2**31 - 1
_TOPUP = 16 << 20
_FRAME = struct.Struct(">I B I")  # (length << 8 | type), flags, stream id


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload) << 8 | ftype, flags, stream) + payload


def _hpack_str(s: bytes) -> bytes:
    if len(s) < 127:
        return bytes([len(s)]) + s
    n, out = len(s) - 127, [127]
    while n >= 128:
        out.append(n % 128 | 128)
        n //= 128
    return bytes(out + [n]) + s


def grpc_headers(authority: str, path: str) -> bytes:
    """An HPACK header block of a gRPC call: literals without indexing, no Huffman."""
    return (b"\x83\x86"  # :method POST, :scheme http (static table 3 and 6)
            + b"\x04" + _hpack_str(path.encode())  # :path (static name 4)
            + b"\x01" + _hpack_str(authority.encode())  # :authority (static name 1)
            + b"\x0f\x10" + _hpack_str(b"application/grpc")  # content-type (static name 31)
            + b"\x00" + _hpack_str(b"te") + _hpack_str(b"trailers"))


class GrpcCallError(RuntimeError):
    pass


class GrpcConnection(asyncio.Protocol):
    """Many concurrent unary-stream calls over one HTTP/2 connection (module docstring)."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._next_id = 1
        self._calls: dict[int, tuple[asyncio.Future, bytearray]] = {}
        self._received = 0
        self.lost: BaseException | None = None
        self._ready = asyncio.get_running_loop().create_future()  # the server's SETTINGS came

    @classmethod
    async def open(cls, host: str, port: int) -> GrpcConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        await asyncio.wait_for(conn._ready, 10.0)
        return conn

    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, _MAX_WINDOW)
        transport.write(_PREFACE + _frame(_SETTINGS, 0, 0, settings)
                        + _frame(_WINDOW, 0, 0, struct.pack(">I", _MAX_WINDOW - 65535)))

    def connection_lost(self, exc) -> None:
        self._fail_all(exc or ConnectionResetError("the server closed the connection"))

    def _fail_all(self, error: BaseException) -> None:
        self.lost = error
        calls, self._calls = self._calls, {}
        for fut, _ in calls.values():
            if not fut.done():
                fut.set_exception(error)
        if not self._ready.done():
            self._ready.set_exception(error)

    async def call(self, headers: bytes, message: bytes) -> list[bytes]:
        """One call: ``headers`` from :func:`grpc_headers`, ``message`` a serialized request;
        returns the response messages."""
        if self.lost is not None:
            raise self.lost
        sid = self._next_id
        self._next_id += 2
        fut = asyncio.get_running_loop().create_future()
        self._calls[sid] = (fut, bytearray())
        self.transport.write(
            _frame(_HEADERS, _END_HEADERS, sid, headers)
            + _frame(_DATA, _END_STREAM, sid, struct.pack(">BI", 0, len(message)) + message))
        return await fut

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        calls = self._calls
        unpack = _FRAME.unpack_from
        while end - pos >= 9:
            lt, flags, sid = unpack(buf, pos)
            length, ftype = lt >> 8, lt & 0xFF
            if end - pos - 9 < length:
                break
            start = pos + 9
            pos = start + length
            sid &= 0x7FFFFFFF
            if ftype == _DATA:
                self._received += length
                call = calls.get(sid)
                if call is not None:
                    if flags & _PADDED:
                        pad = buf[start]
                        call[1].extend(buf[start + 1:pos - pad])
                    else:
                        call[1].extend(buf[start:pos])
                    if flags & _END_STREAM:
                        self._end(sid)
            elif ftype == _HEADERS or ftype == _CONT:
                if flags & _END_STREAM and sid in calls:
                    self._end(sid)
            elif ftype == _SETTINGS:
                if not flags & _ACK:
                    self.transport.write(_frame(_SETTINGS, _ACK, 0))
                    if not self._ready.done():
                        self._ready.set_result(None)
            elif ftype == _PING:
                if not flags & _ACK:
                    self.transport.write(_frame(_PING, _ACK, 0, bytes(buf[start:pos])))
            elif ftype == _RST:
                call = calls.pop(sid, None)
                if call is not None and not call[0].done():
                    code = struct.unpack_from(">I", buf, start)[0]
                    call[0].set_exception(GrpcCallError(f"stream reset by the server "
                                                        f"(HTTP/2 error {code})"))
            elif ftype == _GOAWAY:
                self._fail_all(GrpcCallError(f"GOAWAY from the server: "
                                             f"{bytes(buf[start + 8:pos])[:200]!r}"))
        del buf[:pos]
        if self._received >= _TOPUP:
            self.transport.write(_frame(_WINDOW, 0, 0, struct.pack(">I", self._received)))
            self._received = 0

    def _end(self, sid: int) -> None:
        fut, data = self._calls.pop(sid)
        if fut.done():
            return
        messages, pos = [], 0
        while pos < len(data):
            if len(data) - pos < 5 or data[pos] != 0:
                fut.set_exception(GrpcCallError("a response message is truncated or compressed"))
                return
            n = int.from_bytes(data[pos + 1:pos + 5], "big")
            messages.append(bytes(data[pos + 5:pos + 5 + n]))
            pos += 5 + n
        if pos != len(data):
            fut.set_exception(GrpcCallError("a response message is truncated"))
            return
        fut.set_result(messages)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


__all__ = ["GrpcCallError", "GrpcConnection", "HttpError", "SseConnection", "dechunk",
           "grpc_headers", "http_post"]
