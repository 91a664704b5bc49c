"""The server side of one HTTP/2 connection carrying gRPC calls (an asyncio protocol).

Protocol, as this side implements it (RFC 9113, h2c with prior knowledge, no TLS):

- The client's 24-byte preface, then frames. This side sends its SETTINGS at once
  (MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE :data:`STREAM_WINDOW`, no push) and a connection
  WINDOW_UPDATE up to :data:`CONN_WINDOW`; it acknowledges the client's SETTINGS and applies
  INITIAL_WINDOW_SIZE (to open streams too) and MAX_FRAME_SIZE; it answers PINGs.
- A call is a client stream: HEADERS (+ CONTINUATION) with ``:method POST``, ``:path``,
  ``content-type application/grpc...``, optional ``grpc-timeout`` / ``grpc-encoding``; then
  DATA with length-prefixed request messages; END_STREAM. A unary-request handler runs once
  END_STREAM came, with the one message; a request-streaming one (StreamingRequests) from the
  headers on, each message handed to it as it completes (request_messages.py; see call.py).
  Answers before that:
  unknown method UNIMPLEMENTED, an unsupported ``grpc-encoding`` UNIMPLEMENTED, a malformed
  ``grpc-timeout`` INTERNAL, a request over the size limit RESOURCE_EXHAUSTED, a request
  with no message or more than one INTERNAL; a non-POST request gets HTTP 405 and a
  content-type that is not gRPC HTTP 415, without gRPC status. An answer sent while the
  client has not ended its side is followed by RST_STREAM NO_ERROR.
- Receiving: every DATA frame's length is credited back to the client at once per connection
  (a WINDOW_UPDATE when half the window is used) and per stream while the stream is open.
- Sending: response HEADERS, then each message as DATA within the client's windows (per
  stream and per connection) and MAX_FRAME_SIZE; what does not fit waits for its
  WINDOW_UPDATE; the trailers go after the last byte of data. Frames produced together go out
  in one transport write.
- RST_STREAM from the client, or the connection dropping, cancels the call's handler. A new
  stream beyond MAX_CONCURRENT_STREAMS, or after this side sent GOAWAY, is refused
  (RST_STREAM REFUSED_STREAM; clients retry those elsewhere). Protocol violations end the
  connection with GOAWAY and the error code.
- Shutdown (:meth:`H2Connection.begin_shutdown`): GOAWAY NO_ERROR naming the last stream
  taken; the connection closes when its last call has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time

import hpack

from ferry.rpc import frames as fr
from ferry.rpc.call import RequestStream, ServerCall, StreamingRequests
from ferry.rpc.frames import H2Error, Status, set_nodelay
from ferry.rpc.hpack_cache import BlockDecoder
from ferry.rpc.request_messages import RequestMessages
from ferry.rpc.responder import Responder, Stream

log = logging.getLogger(__name__)

STREAM_WINDOW = 1 << 20
CONN_WINDOW = 16 << 20
MAX_HEADER_BLOCK = 64 * 1024  # bytes of one header block (HEADERS + CONTINUATION)
_ACCEPT_ENCODING = fr.literal(b"grpc-accept-encoding", b"identity,deflate,gzip")
_GRPC_HEADERS = frozenset(("content-type", "te", "grpc-timeout", "grpc-encoding",
                           "grpc-accept-encoding"))


class H2Connection(RequestMessages, Responder, asyncio.Protocol):
    def __init__(self, server) -> None:
        self.server = server  # GrpcServer: methods, limits, the set of connections
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._buf = bytearray()
        self._preface = False
        self._closed = False
        self._decoder = BlockDecoder(MAX_HEADER_BLOCK)
        self._streams: dict[int, Stream] = {}
        self._blocked: dict[int, Stream] = {}
        self._last_sid = 0
        self._cont: tuple[int, int, bytearray] | None = None  # header block being continued
        self._peer_window = fr.DEFAULT_WINDOW
        self._peer_max_frame = fr.DEFAULT_MAX_FRAME
        self._send_window = fr.DEFAULT_WINDOW
        self._recv_credit = 0
        self._first_block = True
        self._goaway_sent = False
        self._peer_goaway = False
        self._paused = False
        self._waiters: list[asyncio.Future] = []

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)
        self.lost = asyncio.get_running_loop().create_future()
        settings = fr.settings_payload({
            fr.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
            fr.INITIAL_WINDOW_SIZE: STREAM_WINDOW, fr.ENABLE_PUSH: 0})
        transport.write(fr.frame(fr.SETTINGS, 0, 0, settings)
                        + fr.window_update(0, CONN_WINDOW - fr.DEFAULT_WINDOW))
        if self.server.stopping:
            self.begin_shutdown()

    def connection_lost(self, exc) -> None:
        self._closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self.server.connections.discard(self)
        streams, self._streams = self._streams, {}
        self._blocked.clear()
        for stream in streams.values():
            stream.reset = True
            self._drop(stream)
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._preface:
            n = min(len(buf), len(fr.PREFACE))
            if buf[:n] != fr.PREFACE[:n]:
                self._fail(H2Error.PROTOCOL_ERROR, "not an HTTP/2 connection preface "
                                                   "(this port speaks gRPC: HTTP/2 only)")
                return
            if n < len(fr.PREFACE):
                return
            del buf[:n]
            self._preface = True
        frames, used, too_big = fr.read_frames(buf)
        for ftype, flags, sid, payload in frames:
            if self._closed:
                return
            if self._cont is not None and ftype != fr.CONTINUATION:
                self._fail(H2Error.PROTOCOL_ERROR, "a header block was interrupted")
                return
            if ftype == fr.DATA:
                self._on_data(flags, sid, payload)
            elif ftype == fr.HEADERS:
                self._on_headers(flags, sid, payload)
            elif ftype == fr.WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif ftype == fr.RST_STREAM:
                self._on_rst(sid, payload)
            elif ftype == fr.SETTINGS:
                self._on_settings(flags, sid, payload)
            elif ftype == fr.PING:
                if len(payload) != 8 or sid:
                    self._fail(H2Error.FRAME_SIZE_ERROR if sid == 0 else H2Error.PROTOCOL_ERROR,
                               "malformed PING")
                elif not flags & fr.ACK:
                    self.transport.write(fr.frame(fr.PING, fr.ACK, 0, payload))
            elif ftype == fr.CONTINUATION:
                self._on_continuation(flags, sid, payload)
            elif ftype == fr.GOAWAY:
                self._peer_goaway = True
                if not self._streams:
                    self.close()
            elif ftype == fr.PUSH_PROMISE:
                self._fail(H2Error.PROTOCOL_ERROR, "a client may not push")
            # PRIORITY and unknown frame types are ignored.
        if too_big and not self._closed:
            self._fail(H2Error.FRAME_SIZE_ERROR, f"a frame of {too_big} bytes (max 16384)")
        if not self._closed:
            del buf[:used]

    # ------------------------------------------------------------------ receiving

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            self._fail(H2Error.PROTOCOL_ERROR, "HEADERS on stream 0")
            return
        try:
            fragment = fr.header_fragment(flags, payload)
        except ValueError as e:
            self._fail(H2Error.PROTOCOL_ERROR, str(e))
            return
        if flags & fr.END_HEADERS:
            self._on_header_block(sid, flags, fragment)
        else:
            self._cont = (sid, flags, bytearray(fragment))

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._cont is None or self._cont[0] != sid:
            self._fail(H2Error.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            return
        block = self._cont[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            self._fail(H2Error.ENHANCE_YOUR_CALM, "header block too large")
        elif flags & fr.END_HEADERS:
            first_flags = self._cont[1]
            self._cont = None
            self._on_header_block(sid, first_flags, bytes(block))

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self._decoder.decode(block)  # always: the HPACK table must stay in step
        except hpack.HPACKError as e:
            self._fail(H2Error.COMPRESSION_ERROR, f"cannot decode a header block: {e}")
            return
        stream = self._streams.get(sid)
        if stream is not None:  # trailers from the client: they end its side
            if flags & fr.END_STREAM and not stream.remote_closed:
                if stream.inbox is not None:
                    self._take_messages(stream, True)
                else:
                    self._end_of_request(stream)
            return
        if sid % 2 == 0:
            self._fail(H2Error.PROTOCOL_ERROR, f"HEADERS on even stream {sid}")
            return
        if sid <= self._last_sid:
            return  # a stream this side already answered: its late trailers are dropped
        self._last_sid = sid
        if self._goaway_sent or len(self._streams) >= self.server.max_concurrent_streams:
            self.transport.write(fr.rst_stream(sid, H2Error.REFUSED_STREAM))
            return
        self._open_stream(sid, flags, headers)

    def _open_stream(self, sid: int, flags: int, headers) -> None:
        method = path = ctype = timeout = encoding = None
        metadata = []
        for name, value in headers:
            if name[0] == ":":
                if name == ":path":
                    path = value
                elif name == ":method":
                    method = value
            elif name in _GRPC_HEADERS:
                if name == "content-type":
                    ctype = value
                elif name == "grpc-timeout":
                    timeout = value
                elif name == "grpc-encoding":
                    encoding = value
            else:
                metadata.append((name, value))
        stream = Stream(sid, self._peer_window)
        stream.remote_closed = bool(flags & fr.END_STREAM)
        if method != "POST":
            self._answer_http(stream, 405)
            return
        if ctype is None or not ctype.startswith("application/grpc"):
            self._answer_http(stream, 415)
            return
        handler = self.server.handler(path)
        if handler is None:
            self._answer(stream, Status.UNIMPLEMENTED, f"unknown method {path}")
            return
        if encoding not in (None, "identity", "gzip", "deflate"):
            self._answer(stream, Status.UNIMPLEMENTED,
                         f"grpc-encoding {encoding!r} is not supported (use identity, deflate "
                         f"or gzip)", _ACCEPT_ENCODING)
            return
        deadline = None
        if timeout is not None:
            try:
                seconds = fr.parse_timeout(timeout)
            except ValueError as e:
                self._answer(stream, Status.INTERNAL, str(e))
                return
            deadline = time.monotonic() + seconds
            stream.timer = asyncio.get_running_loop().call_later(seconds, self._expire, stream)
        stream.encoding = encoding
        stream.handler = handler
        stream.call = ServerCall(self, stream, path, tuple(metadata), deadline, self.peer)
        self._streams[sid] = stream
        if isinstance(handler, StreamingRequests):
            stream.inbox = RequestStream()
            stream.task = asyncio.get_running_loop().create_task(
                self._serve(stream, handler.handler, stream.inbox))
            if stream.remote_closed:
                stream.inbox.close()
        elif stream.remote_closed:
            self._end_of_request(stream)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        length = len(payload)
        self._recv_credit += length
        if self._recv_credit >= CONN_WINDOW // 2:
            self.transport.write(fr.window_update(0, self._recv_credit))
            self._recv_credit = 0
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            if sid == 0 or sid > self._last_sid:
                self._fail(H2Error.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream already answered or reset: its data is dropped
        if flags & fr.PADDED:
            pad = payload[0] if payload else 0
            if pad >= length:
                self._fail(H2Error.PROTOCOL_ERROR, "DATA padding exceeds the frame")
                return
            payload = payload[1:length - pad]
        stream.body += payload
        if len(stream.body) > self.server.max_receive_message_length + 5:
            self._end(stream, Status.RESOURCE_EXHAUSTED,
                      f"the request is larger than the server's limit of "
                      f"{self.server.max_receive_message_length} bytes")
            return
        if stream.inbox is not None:
            if not self._take_messages(stream, bool(flags & fr.END_STREAM)):
                return
        elif flags & fr.END_STREAM:
            self._end_of_request(stream)
            return
        if flags & fr.END_STREAM:
            return
        stream.recv_unacked += length
        if stream.recv_unacked >= STREAM_WINDOW // 2:
            self.transport.write(fr.window_update(sid, stream.recv_unacked))
            stream.recv_unacked = 0

    def _on_rst(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4 or sid == 0:
            self._fail(H2Error.PROTOCOL_ERROR, "malformed RST_STREAM")
            return
        stream = self._streams.get(sid)
        if stream is not None:
            stream.reset = True
            self._drop(stream)

    def _expire(self, stream: Stream) -> None:
        stream.timer = None
        stream.expired = True
        if stream.task is not None:
            stream.task.cancel()  # _serve answers DEADLINE_EXCEEDED
        elif not stream.ended:
            self._end(stream, Status.DEADLINE_EXCEEDED, "deadline exceeded")

    def _fail(self, code: H2Error, message: str) -> None:
        """A connection error: GOAWAY with ``code``, then close."""
        if self._closed:
            return
        log.info("closing an HTTP/2 connection from %s: %s (%s)", self.peer, message, code.name)
        self.transport.write(fr.goaway(self._last_sid, code, message.encode()[:256]))
        self._closed = True
        self.transport.close()

    # ------------------------------------------------------------------ shutdown

    def begin_shutdown(self) -> None:
        """GOAWAY: no new calls; close once the running ones have ended."""
        if self._goaway_sent or self._closed:
            return
        self._goaway_sent = True
        self.transport.write(fr.goaway(self._last_sid, H2Error.NO_ERROR))
        if not self._streams:
            self.close()

    def running_tasks(self) -> list[asyncio.Task]:
        return [s.task for s in self._streams.values() if s.task is not None]

    def abort_pending(self) -> None:
        """After the grace period: end every call that is still running or waiting."""
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()  # _serve answers UNAVAILABLE
            else:
                self._end(stream, Status.UNAVAILABLE, "the server is shutting down")

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.close()


__all__ = ["CONN_WINDOW", "STREAM_WINDOW", "H2Connection", "Stream"]
