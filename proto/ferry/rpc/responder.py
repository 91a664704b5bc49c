"""The response side of a connection (a mixin of :class:`~ferry.rpc.connection.
H2Connection`, which owns the state it uses): a call's handler task, its messages under the
client's flow-control windows (their WINDOW_UPDATE and SETTINGS frames), its status.

Per call (a :class:`Stream`): the response HEADERS go out with the first message or the
status; messages are queued framed in ``Stream.out`` and sent as DATA as far as the stream's
and the connection's send windows and the peer's MAX_FRAME_SIZE allow (the rest waits in
``_blocked`` for a WINDOW_UPDATE); the status (trailers, END_STREAM) goes after the last byte
of data, or alone as a trailers-only HEADERS when nothing was sent. Everything one step
produces goes out in one transport write. A stream is forgotten once its END_STREAM is sent
(RST_STREAM NO_ERROR too if the client had not ended its side), or once it is reset.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ferry.rpc import frames as fr
from ferry.rpc.call import HIGH_WATER, GrpcError, ServerCall
from ferry.rpc.frames import H2Error, Status

log = logging.getLogger(__name__)
BIG_MESSAGE = 256 * 1024  # from this size a message that fits the windows is written as is
_IOV_MAX = 1024


class Stream:
    """One client stream (a call) on a connection."""

    __slots__ = (
        "body",
        "call",
        "encoding",
        "ended",
        "expired",
        "handler",
        "headers_sent",
        "inbox",
        "out",
        "recv_unacked",
        "remote_closed",
        "reset",
        "send_window",
        "sid",
        "task",
        "timer",
        "trailers",
    )

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.body = bytearray()
        self.send_window = send_window
        self.recv_unacked = 0
        self.out = bytearray()  # framed messages waiting for flow-control window
        self.trailers: bytes | None = None  # set when the call ended: go after ``out``
        self.headers_sent = False
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False
        self.reset = False  # the client reset it, or the connection is gone: send nothing
        self.remote_closed = False
        self.ended = False  # removed from the connection
        self.encoding: str | None = None
        self.call: ServerCall | None = None
        self.handler = None
        self.inbox = None  # RequestStream of a request-streaming call



class Responder:
    """Sending, for :class:`H2Connection` (module docstring)."""

    # ------------------------------------------------------------------ the peer's windows

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(H2Error.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
            return
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            self._send_window += inc
            if inc == 0 or self._send_window > fr.MAX_WINDOW:
                self._fail(H2Error.PROTOCOL_ERROR if inc == 0 else H2Error.FLOW_CONTROL_ERROR,
                           "bad connection WINDOW_UPDATE")
                return
            for stream in list(self._blocked.values()):
                self._flush(stream)
            return
        stream = self._streams.get(sid)
        if stream is None:
            return
        stream.send_window += inc
        if inc == 0 or stream.send_window > fr.MAX_WINDOW:
            self.transport.write(fr.rst_stream(sid, H2Error.PROTOCOL_ERROR if inc == 0
                                               else H2Error.FLOW_CONTROL_ERROR))
            stream.reset = True
            self._drop(stream)
        elif sid in self._blocked:
            self._flush(stream)

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            self._fail(H2Error.PROTOCOL_ERROR, "SETTINGS on a stream")
            return
        if flags & fr.ACK:
            if payload:
                self._fail(H2Error.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            self._fail(H2Error.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
            return
        for key, value in fr.parse_settings(payload):
            if key == fr.INITIAL_WINDOW_SIZE:
                if value > fr.MAX_WINDOW:
                    self._fail(H2Error.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                    return
                delta, self._peer_window = value - self._peer_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == fr.MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME <= value <= fr.MAX_FRAME_LIMIT:
                    self._fail(H2Error.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                    return
                self._peer_max_frame = value
            elif key == fr.ENABLE_PUSH and value > 1:
                self._fail(H2Error.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
                return
        self.transport.write(fr.frame(fr.SETTINGS, fr.ACK, 0))
        for stream in list(self._blocked.values()):
            self._flush(stream)

    # ------------------------------------------------------------------ the call

    async def _serve(self, stream: Stream, handler, request: bytes) -> None:
        try:
            last = await handler(request, stream.call)
            if last is not None:
                self._queue(stream, last)
        except asyncio.CancelledError:
            if stream.expired:
                self._end(stream, Status.DEADLINE_EXCEEDED, "deadline exceeded")
            elif self.server.stopping:
                self._end(stream, Status.UNAVAILABLE, "the server is shutting down")
            else:
                self._end(stream, Status.CANCELLED, "cancelled")
        except GrpcError as e:
            self._end(stream, e.code, e.message)
        except Exception:
            log.exception("method handler %s failed", stream.call.method)
            self._end(stream, Status.UNKNOWN, "the method handler raised an exception "
                                              "(see the server's log)")
        else:
            self._end(stream, Status.OK)

    async def write_message(self, stream: Stream, message: bytes) -> None:
        if stream.trailers is not None or stream.ended:
            if stream.reset:
                raise asyncio.CancelledError()
            raise RuntimeError("the call has ended: no more messages may be written")
        self._queue(stream, message)
        while (len(stream.out) > HIGH_WATER or self._paused) and not stream.ended:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def _queue(self, stream: Stream, message) -> None:
        """Queue one message: serialized bytes, or a list / tuple of buffers whose
        concatenation it is (written gathered, without joining them, when it can be)."""
        if isinstance(message, (list, tuple)):
            parts = [memoryview(p).cast("B") for p in message]
            length = sum(p.nbytes for p in parts)
        elif isinstance(message, (bytes, bytearray, memoryview)):
            parts, length = None, len(message)
        else:
            raise TypeError(f"a response message is serialized bytes (or a list of buffers), "
                            f"got {type(message).__name__}")
        size = length + 5
        if size >= BIG_MESSAGE and not stream.out and not self._closed and not stream.reset \
                and size <= min(stream.send_window, self._send_window, self._peer_max_frame):
            # One DATA frame, the message itself handed to the socket: no copy of it here.
            head = b""
            if not stream.headers_sent:
                stream.headers_sent = True
                head = fr.frame(fr.HEADERS, fr.END_HEADERS, stream.sid,
                                self._block(fr.response_headers()))
            stream.send_window -= size
            self._send_window -= size
            head += fr.FRAME_HEADER.pack(size << 8 | fr.DATA, 0, stream.sid) \
                + fr.MESSAGE_PREFIX.pack(0, length)
            self._write_gathered([head, *(parts or [message])])
            return
        stream.out += fr.MESSAGE_PREFIX.pack(0, length)
        for part in parts or (message,):
            stream.out += part
        self._flush(stream)

    def _write_gathered(self, parts: list) -> None:
        """Write buffers in order: with one writev straight to the socket while the transport
        holds nothing back (what the socket does not take goes through the transport)."""
        sent = 0
        if not self.transport.get_write_buffer_size():
            sock = self.transport.get_extra_info("socket")
            try:
                sent = os.writev(sock.fileno(), parts[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport reports the broken connection
        for part in parts:
            n = memoryview(part).nbytes
            if sent >= n:
                sent -= n
                continue
            self.transport.write(part[sent:] if sent else part)
            sent = 0

    def _end(self, stream: Stream, status: int, message: str = "", extra: bytes = b"") -> None:
        """End the call with a status (after its queued messages)."""
        if stream.ended or stream.reset or stream.trailers is not None:
            return
        if stream.expired and stream.out:  # the client gave up: drop what it has not taken
            self.transport.write(fr.rst_stream(stream.sid, H2Error.CANCEL))
            stream.reset = True
            self._drop(stream)
        elif stream.headers_sent or stream.out:
            stream.trailers = fr.trailers(status, message)
            self._flush(stream)
        else:
            self.transport.write(fr.frame(fr.HEADERS, fr.END_STREAM | fr.END_HEADERS, stream.sid,
                                          self._block(fr.trailers_only(status, message, extra))))
            self._close(stream)

    def _answer(self, stream: Stream, status: int, message: str, extra: bytes = b"") -> None:
        """Answer a stream that never reached a handler (trailers only)."""
        self._end(stream, status, message, extra)

    def _answer_http(self, stream: Stream, code: int) -> None:
        self.transport.write(fr.frame(fr.HEADERS, fr.END_STREAM | fr.END_HEADERS, stream.sid,
                                      self._block(fr.http_status_only(code))))
        self._close(stream)

    def _block(self, block: bytes) -> bytes:
        if self._first_block:
            self._first_block = False
            return fr.TABLE_SIZE_ZERO + block
        return block

    # ------------------------------------------------------------------ sending

    def _flush(self, stream: Stream) -> None:
        if self._closed or stream.reset:
            return
        sid = stream.sid
        parts = []
        if not stream.headers_sent:
            stream.headers_sent = True
            parts.append(fr.frame(fr.HEADERS, fr.END_HEADERS, sid,
                                  self._block(fr.response_headers())))
        out = stream.out
        while out:
            n = min(len(out), stream.send_window, self._send_window, self._peer_max_frame)
            if n <= 0:
                self._blocked[sid] = stream
                break
            parts.append(fr.frame(fr.DATA, 0, sid, bytes(out[:n])))
            del out[:n]
            stream.send_window -= n
            self._send_window -= n
        if not out:
            self._blocked.pop(sid, None)
            if stream.trailers is not None:
                parts.append(fr.frame(fr.HEADERS, fr.END_STREAM | fr.END_HEADERS, sid,
                                      stream.trailers))
        if parts:
            self.transport.write(b"".join(parts))
        if not out and stream.trailers is not None:
            self._close(stream)
        elif self._waiters and len(out) <= HIGH_WATER:
            self._wake()

    def _close(self, stream: Stream) -> None:
        """The response is complete: forget the stream (RST NO_ERROR if the client is still
        sending)."""
        if not stream.remote_closed and not self._closed:
            self.transport.write(fr.rst_stream(stream.sid, H2Error.NO_ERROR))
        self._drop(stream)

    def _drop(self, stream: Stream) -> None:
        stream.ended = True
        self._streams.pop(stream.sid, None)
        self._blocked.pop(stream.sid, None)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        task = stream.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()  # reset by the client, or ended here while its handler still ran
        if self._waiters:
            self._wake()
        if not self._streams and (self._goaway_sent or self._peer_goaway) and not self._closed:
            self._closed = True
            self.transport.close()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


__all__ = ["Responder", "Stream"]
