"""The request messages of a call (a mixin of :class:`~ferry.rpc.connection.H2Connection`,
which owns the state it uses): a call's DATA bytes cut into gRPC messages (5-byte prefix:
compressed flag, length), decompressed per ``grpc-encoding`` (gzip, deflate) within the
server's size limit, then either handed to a unary-request handler as its one message once
the client ended its side (none, or more than one: INTERNAL), or pushed one by one into a
request-streaming call's :class:`~ferry.rpc.call.RequestStream` (a truncated last message:
INTERNAL).
"""

from __future__ import annotations

import asyncio
import zlib

from ferry.rpc import frames as fr
from ferry.rpc.call import GrpcError
from ferry.rpc.frames import Status
from ferry.rpc.responder import Stream


class RequestMessages:
    """Request bodies to messages, for :class:`H2Connection` (module docstring)."""

    def _take_messages(self, stream: Stream, end: bool) -> bool:
        """Hand a request-streaming call the messages its body now holds (False: the call
        ended on a bad one)."""
        body = stream.body
        pos = 0
        while len(body) - pos >= 5:
            compressed, n = fr.MESSAGE_PREFIX.unpack_from(body, pos)
            if len(body) - pos - 5 < n:
                break
            message = bytes(body[pos + 5:pos + 5 + n])
            pos += 5 + n
            if compressed:
                try:
                    message = self._decompress(stream.encoding, message)
                except GrpcError as e:
                    self._end(stream, e.code, e.message)
                    return False
            stream.inbox.push(message)
        del body[:pos]
        if end:
            stream.remote_closed = True
            if body:
                self._end(stream, Status.INTERNAL, "the last request message is truncated")
                return False
            stream.inbox.close()
        return True

    def _end_of_request(self, stream: Stream) -> None:
        stream.remote_closed = True
        body = stream.body
        stream.body = bytearray()
        if len(body) < 5:
            self._end(stream, Status.INTERNAL, "the call carried no request message")
            return
        compressed, n = fr.MESSAGE_PREFIX.unpack_from(body)
        if 5 + n != len(body):
            self._end(stream, Status.INTERNAL,
                      "this method takes exactly one request message" if 5 + n < len(body)
                      else "the request message is truncated")
            return
        request = bytes(body[5:])
        if compressed:
            try:
                request = self._decompress(stream.encoding, request)
            except GrpcError as e:
                self._end(stream, e.code, e.message)
                return
        stream.task = asyncio.get_running_loop().create_task(
            self._serve(stream, stream.handler, request))

    def _decompress(self, encoding: str | None, data: bytes) -> bytes:
        if encoding in (None, "identity"):
            raise GrpcError(Status.INTERNAL, "a compressed message without grpc-encoding")
        limit = self.server.max_receive_message_length
        d = zlib.decompressobj(31 if encoding == "gzip" else 15)
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error as e:
            raise GrpcError(Status.INTERNAL, f"cannot decompress the request: {e}") from None
        if len(out) <= limit and not d.eof:
            raise GrpcError(Status.INTERNAL, "the compressed request is truncated")
        if len(out) > limit:
            raise GrpcError(Status.RESOURCE_EXHAUSTED,
                            f"the request is larger than the server's limit of {limit} bytes")
        return out


__all__ = ["RequestMessages"]
