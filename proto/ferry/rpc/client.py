"""The client side of one long-lived bidirectional-streaming gRPC call, on its own HTTP/2
connection, parsed and answered on the event loop (no grpc poller thread, as server.py).

:class:`BidiCall` behaves like the call object of grpc.aio's ``stream_stream``:
``await call.write(message)``, ``await call.read()`` (a response message, or ``grpc.aio.EOF``
once the call ended OK), ``await call.done_writing()`` and ``call.cancel()``; a call that ends
with another status makes ``read`` raise ``grpc.aio.AioRpcError`` with it (so callers handle
both kinds of call alike). It is meant for a frontend's one stream per worker, where every
message through grpc.aio costs a round trip through grpc's poller thread.

Protocol, as this side implements it (RFC 9113, h2c with prior knowledge):

- connect, send the preface, SETTINGS (no push, INITIAL_WINDOW_SIZE :data:`RECV_WINDOW`), a
  connection WINDOW_UPDATE to :data:`RECV_WINDOW`, and the call's HEADERS on stream 1
  (``:method POST``, ``:scheme http``, ``:path``, ``:authority``, ``content-type
  application/grpc``, ``te trailers``; HPACK literals, no encoder state);
- each request message is one gRPC-framed message sent as DATA within the server's windows
  and MAX_FRAME_SIZE (held back until its WINDOW_UPDATE otherwise; ``write`` waits while
  more than :data:`HIGH_WATER` bytes are held); ``done_writing`` sends END_STREAM;
- DATA received is credited back at once (a WINDOW_UPDATE per connection and stream when
  half the window is used); messages are parsed as they complete and queued for ``read``;
- the server's header blocks are decoded (hpack_cache.BlockDecoder); the one with END_STREAM
  carries ``grpc-status`` / ``grpc-message``, which end the call; a response that is not
  HTTP 200 ends it with the status grpc maps it to (404 UNIMPLEMENTED, 429/502/503/504
  UNAVAILABLE, 400 INTERNAL, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, others UNKNOWN),
  a response message over ``max_receive_message_length`` or one the deserializer refuses
  with RESOURCE_EXHAUSTED / INTERNAL, RST_STREAM with CANCELLED
  (CANCEL) or UNAVAILABLE (REFUSED_STREAM) or INTERNAL, GOAWAY before the call was taken
  and a lost or refused connection with UNAVAILABLE;
- PINGs are answered, SETTINGS acknowledged and applied (INITIAL_WINDOW_SIZE,
  MAX_FRAME_SIZE);
- keepalive: when nothing has come from the server for ``keepalive_s`` seconds, a PING (at
  most one per ``max(keepalive_s, keepalive_timeout_s)``); no answer (nor anything else)
  within ``keepalive_timeout_s`` ends the call with UNAVAILABLE
  (a peer that vanished without closing the connection is noticed, as grpc's keepalive does);
- ``cancel()`` sends RST_STREAM CANCEL and closes the connection; a ``read`` or ``write``
  waiting then raises ``asyncio.CancelledError``, as with grpc.aio.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import grpc

from ferry.rpc import frames as fr
from ferry.rpc.client_receive import RECV_WINDOW, Receiver
from ferry.rpc.client_receive import SID as _SID
from ferry.rpc.client_receive import error as _error
from ferry.rpc.frames import H2Error
from ferry.rpc.hpack_cache import BlockDecoder

HIGH_WATER = 256 * 1024
KEEPALIVE_S = 20.0
KEEPALIVE_TIMEOUT_S = 10.0
_PING = b"ferry-ka"


class BidiCall(Receiver, asyncio.Protocol):
    def __init__(self, target: str, method: str, request_serializer: Callable[[Any], bytes],
                 response_deserializer: Callable[[bytes], Any], *,
                 keepalive_s: float = KEEPALIVE_S,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                 max_receive_message_length: int = 4 << 20) -> None:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"target is host:port, got {target!r}")
        if not (keepalive_s > 0 and keepalive_timeout_s > 0):
            raise ValueError(f"keepalive_s and keepalive_timeout_s must be > 0, got "
                             f"{keepalive_s!r}, {keepalive_timeout_s!r}")
        self._max_receive = int(max_receive_message_length)
        self._keepalive_s = float(keepalive_s)
        self._keepalive_timeout_s = float(keepalive_timeout_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._ping_sent_at: float | None = None
        self._host, self._port = host.strip("[]"), int(port)
        self._headers = fr.request_headers(target, method)
        self._serialize = request_serializer
        self._deserialize = response_deserializer
        self.transport: asyncio.Transport | None = None
        self._connecting: asyncio.Task | None = None
        self._decoder = BlockDecoder(1 << 20)
        self._buf = bytearray()
        self._msg = bytearray()  # response bytes not yet a whole message
        self._messages: collections.deque = collections.deque()
        self._reader: asyncio.Future | None = None
        self._out = bytearray()  # request bytes held back by flow control
        self._half_closed = False  # done_writing() called: END_STREAM goes after _out
        self._end_sent = False
        self._writers: list[asyncio.Future] = []
        self._send_window = fr.DEFAULT_WINDOW  # connection
        self._stream_window = fr.DEFAULT_WINDOW
        self._peer_initial = fr.DEFAULT_WINDOW
        self._peer_max_frame = fr.DEFAULT_MAX_FRAME
        self._conn_credit = 0
        self._stream_credit = 0
        self._headers_seen = False
        self._cont: bytearray | None = None
        self._cont_end = False
        self._done: BaseException | None = None  # how the call ended: read() raises/returns it
        self._cancelled = False

    # ------------------------------------------------------------------ the call's API

    async def write(self, message: Any) -> None:
        await self._connected()
        if self._cancelled:
            raise asyncio.CancelledError()
        if isinstance(self._done, grpc.aio.AioRpcError):
            raise self._done
        if self._done is not None or self._half_closed:
            raise RuntimeError("the call's requests were ended (done_writing, or the call is "
                               "over): no more messages")
        data = self._serialize(message)
        self._out += fr.MESSAGE_PREFIX.pack(0, len(data))
        self._out += data
        self._flush()
        while len(self._out) > HIGH_WATER and self._done is None:
            fut = asyncio.get_running_loop().create_future()
            self._writers.append(fut)
            await fut
        if self._cancelled:
            raise asyncio.CancelledError()
        if isinstance(self._done, grpc.aio.AioRpcError) and self._out:
            raise self._done  # the call ended before this message went out

    async def done_writing(self) -> None:
        await self._connected()
        if self._done is None and not self._half_closed:
            self._half_closed = True
            self._flush()

    async def read(self) -> Any:
        await self._connected()
        if self._reader is not None:
            raise RuntimeError("another read() is waiting: one reader at a time")
        while not self._messages:
            if self._done is not None:
                if self._cancelled:
                    raise asyncio.CancelledError()
                if self._done is grpc.aio.EOF:
                    return grpc.aio.EOF
                raise self._done
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self._messages.popleft()

    def cancel(self) -> bool:
        if self._done is not None:
            return False
        self._cancelled = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(fr.rst_stream(_SID, H2Error.CANCEL))
            self.transport.close()
        self._finish(_error(grpc.StatusCode.CANCELLED, "cancelled by the client"))
        return True

    def done(self) -> bool:
        return self._done is not None

    # ------------------------------------------------------------------ connection

    async def _connected(self) -> None:
        if self.transport is not None or self._done is not None:
            return
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        await asyncio.shield(self._connecting)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self, self._host, self._port)
        except OSError as e:
            self._finish(_error(grpc.StatusCode.UNAVAILABLE,
                                f"cannot connect to {self._host}:{self._port}: {e}"))

    def connection_made(self, transport) -> None:
        self.transport = transport
        fr.set_nodelay(transport)
        if self._done is not None:  # cancelled while connecting
            transport.close()
            return
        self._loop = loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        self._timer = loop.call_later(self._keepalive_s, self._check_alive)
        settings = fr.settings_payload({fr.ENABLE_PUSH: 0, fr.INITIAL_WINDOW_SIZE: RECV_WINDOW})
        transport.write(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0, settings)
                        + fr.window_update(0, RECV_WINDOW - fr.DEFAULT_WINDOW)
                        + fr.frame(fr.HEADERS, fr.END_HEADERS, _SID, self._headers))

    def connection_lost(self, exc) -> None:
        self._finish(_error(grpc.StatusCode.UNAVAILABLE,
                            f"the connection to {self._host}:{self._port} was lost"
                            + (f": {exc}" if exc else "")))

    def _finish(self, outcome: BaseException | object) -> None:
        if self._done is not None:
            return
        self._done = outcome
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._wake_reader()
        writers, self._writers = self._writers, []
        for fut in writers:
            if not fut.done():
                fut.set_result(None)

    def _check_alive(self) -> None:
        """The keepalive timer (module docstring)."""
        if self._done is not None:
            return
        now = self._loop.time()
        if self._ping_sent_at is not None:
            if self._last_rx < self._ping_sent_at \
                    and now - self._ping_sent_at >= self._keepalive_timeout_s:
                self._finish(_error(grpc.StatusCode.UNAVAILABLE,
                                    f"{self._host}:{self._port} did not answer a keepalive ping "
                                    f"within {self._keepalive_timeout_s:g} s"))
                return
            self._ping_sent_at = None
        idle = now - self._last_rx
        if idle >= self._keepalive_s:
            self.transport.write(fr.frame(fr.PING, 0, 0, _PING))
            self._ping_sent_at = now
            self._timer = self._loop.call_later(self._keepalive_timeout_s, self._check_alive)
        else:
            self._timer = self._loop.call_later(self._keepalive_s - idle, self._check_alive)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _fail(self, code: H2Error, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(fr.goaway(0, code, message.encode()[:256]))
        self._finish(_error(grpc.StatusCode.INTERNAL, f"HTTP/2 error from the server: "
                                                      f"{message}"))

    # ------------------------------------------------------------------ sending

    def _flush(self) -> None:
        if self.transport is None or self._done is not None:
            return
        out = self._out
        parts = []
        while out:
            n = min(len(out), self._stream_window, self._send_window, self._peer_max_frame)
            if n <= 0:
                break
            parts.append(fr.frame(fr.DATA, 0, _SID, bytes(out[:n])))
            del out[:n]
            self._stream_window -= n
            self._send_window -= n
        if not out and self._half_closed and not self._end_sent:
            self._end_sent = True
            parts.append(fr.frame(fr.DATA, fr.END_STREAM, _SID))
        if parts:
            self.transport.write(b"".join(parts))
        if self._writers and len(out) <= HIGH_WATER:
            writers, self._writers = self._writers, []
            for fut in writers:
                if not fut.done():
                    fut.set_result(None)


__all__ = ["HIGH_WATER", "RECV_WINDOW", "BidiCall"]
