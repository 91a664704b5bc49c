"""The receiving side of :class:`~ferry.rpc.client.BidiCall` (a mixin; the call
owns the state it uses): frames from the server parsed as they come, DATA credited back and
cut into response messages for ``read``, header blocks decoded, the status that ends the
call, the server's SETTINGS, PINGs, resets and GOAWAY (client.py's docstring states the
protocol).
"""

from __future__ import annotations

import struct

import grpc

from ferry.rpc import frames as fr
from ferry.rpc.frames import H2Error

SID = 1  # the call's stream: the only one on its connection
RECV_WINDOW = 16 << 20  # what the client announces, per stream and per connection
_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def error(code: grpc.StatusCode | int, details: str) -> grpc.aio.AioRpcError:
    if not isinstance(code, grpc.StatusCode):
        code = _STATUS.get(int(code), grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)



class Receiver:
    """Receiving, for :class:`BidiCall` (module docstring)."""

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        buf = self._buf
        buf += data
        frames, used, too_big = fr.read_frames(buf)
        for ftype, flags, sid, payload in frames:
            if self._done is not None:
                return
            if ftype == fr.DATA:
                self._on_data(flags, sid, payload)
            elif ftype == fr.HEADERS or ftype == fr.CONTINUATION:
                self._on_headers(ftype, flags, sid, payload)
            elif ftype == fr.WINDOW_UPDATE and len(payload) == 4:
                inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
                if sid == 0:
                    self._send_window += inc
                elif sid == SID:
                    self._stream_window += inc
                self._flush()
            elif ftype == fr.SETTINGS and not flags & fr.ACK:
                self._on_settings(payload)
            elif ftype == fr.PING and not flags & fr.ACK:
                self.transport.write(fr.frame(fr.PING, fr.ACK, 0, payload))
            elif ftype == fr.RST_STREAM and sid == SID:
                code = int.from_bytes(payload[:4], "big")
                self._finish(error(fr.reset_status(code),
                                   f"the server reset the call (HTTP/2 error {code})"))
            elif ftype == fr.GOAWAY and len(payload) >= 8:
                last, code = struct.unpack_from(">II", payload)
                if (last & 0x7FFFFFFF) < SID or code != H2Error.NO_ERROR:
                    self._finish(error(grpc.StatusCode.UNAVAILABLE,
                                        f"the server closed the connection (GOAWAY {code}: "
                                        f"{payload[8:200]!r})"))
        if too_big and self._done is None:
            self._fail(H2Error.FRAME_SIZE_ERROR, f"a frame of {too_big} bytes")
            return
        del buf[:used]

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        n = len(payload)
        self._conn_credit += n
        if sid == SID:
            if flags & fr.PADDED and payload:
                payload = payload[1:n - payload[0]]
            msg = self._msg
            msg += payload
            pos, got = 0, False
            while len(msg) - pos >= 5:
                compressed, size = fr.MESSAGE_PREFIX.unpack_from(msg, pos)
                if size > self._max_receive:
                    self._finish(error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"a response message of {size} bytes (limit "
                                        f"{self._max_receive})"))
                    return
                if len(msg) - pos - 5 < size:
                    break
                if compressed:
                    self._finish(error(grpc.StatusCode.INTERNAL,
                                        "the server sent a compressed message"))
                    return
                try:
                    message = self._deserialize(bytes(msg[pos + 5:pos + 5 + size]))
                except Exception as e:  # noqa: BLE001 - whatever the deserializer raises
                    self._finish(error(grpc.StatusCode.INTERNAL,
                                        f"cannot parse a response message: {e}"))
                    return
                self._messages.append(message)
                pos += 5 + size
                got = True
            del msg[:pos]
            if got:
                self._wake_reader()
            if not flags & fr.END_STREAM:
                self._stream_credit += n
                if self._stream_credit >= RECV_WINDOW // 2:
                    self.transport.write(fr.window_update(SID, self._stream_credit))
                    self._stream_credit = 0
        if self._conn_credit >= RECV_WINDOW // 2:
            self.transport.write(fr.window_update(0, self._conn_credit))
            self._conn_credit = 0
        if flags & fr.END_STREAM and sid == SID:
            self._finish(error(grpc.StatusCode.INTERNAL, "the call ended without a status"))

    def _on_headers(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == fr.HEADERS:
            try:
                self._cont = bytearray(fr.header_fragment(flags, payload))
            except ValueError as e:
                self._fail(H2Error.PROTOCOL_ERROR, str(e))
                return
            self._cont_end = bool(flags & fr.END_STREAM)
        elif self._cont is None:
            self._fail(H2Error.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            return
        else:
            self._cont += payload
        if not flags & fr.END_HEADERS:
            return
        block, self._cont = bytes(self._cont), None
        try:
            headers = dict(self._decoder.decode(block))  # always: the table stays in step
        except Exception as e:  # noqa: BLE001 - hpack errors of any kind end the call
            self._fail(H2Error.COMPRESSION_ERROR, f"cannot decode a header block: {e}")
            return
        if sid != SID:
            return
        if not self._headers_seen:
            self._headers_seen = True
            status = headers.get(":status")
            if status != "200":
                self._finish(error(fr.http_status(status), f"the server answered HTTP {status}"))
                return
        if self._cont_end:
            status, message = fr.call_status(headers)
            self._finish(grpc.aio.EOF if status == fr.Status.OK else error(status, message))

    def _on_settings(self, payload: bytes) -> None:
        for key, value in fr.parse_settings(payload[:len(payload) - len(payload) % 6]):
            if key == fr.INITIAL_WINDOW_SIZE:
                self._stream_window += value - self._peer_initial
                self._peer_initial = value
            elif key == fr.MAX_FRAME_SIZE:
                self._peer_max_frame = value
        self.transport.write(fr.frame(fr.SETTINGS, fr.ACK, 0))
        self._flush()


__all__ = ["SID", "Receiver", "error"]
