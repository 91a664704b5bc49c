"""What a method handler of :class:`~ferry.rpc.server.GrpcServer` sees: one call.

A handler is ``async def handler(request: bytes, call: ServerCall) -> bytes | None``. It gets
the call's one request message (serialized, decompressed) once the client has sent all of it.
A method registered as :class:`StreamingRequests` instead gets a :class:`RequestStream` of
the client's messages and runs from the moment the call's headers came.
Every message it passes to ``await call.write(message)`` goes out at once (as far as HTTP/2
flow control lets it; ``write`` waits while more than :data:`HIGH_WATER` bytes are held back
for the peer); a message it returns goes out last, in the same write as the status. A unary
method returns its response; a server-streaming one writes and may return its last message or
None. The call then ends with status OK.

Raising :class:`GrpcError` ends the call with that status and message (after what was already
written). Any other exception ends it with UNKNOWN (and is logged by the server). When the
client cancels the call (RST_STREAM) or its connection drops, the handler's task is cancelled
and nothing more is sent; when the call's ``grpc-timeout`` passes, the task is cancelled and
the call ends with DEADLINE_EXCEEDED; when the server stops after its grace period, with
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ferry.rpc.frames import Status

if TYPE_CHECKING:
    from ferry.rpc.connection import H2Connection, Stream

HIGH_WATER = 256 * 1024  # bytes held back for the peer's flow control before write() waits


class GrpcError(Exception):
    """End the call with ``code`` (a gRPC status number) and ``message``."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = Status(int(code))
        self.message = message


class ServerCall:
    """One call: its method, metadata and deadline, and ``write`` for its messages."""

    __slots__ = ("_conn", "_stream", "deadline", "metadata", "method", "peer")

    def __init__(self, conn: H2Connection, stream: Stream, method: str,
                 metadata: tuple[tuple[str, str], ...], deadline: float | None,
                 peer: str) -> None:
        self.method = method
        self.metadata = metadata  # request headers but pseudo-headers and the gRPC ones
        self.deadline = deadline  # time.monotonic() of the client's grpc-timeout, or None
        self.peer = peer
        self._conn = conn
        self._stream = stream

    def cancelled(self) -> bool:
        """The client cancelled the call, its deadline passed, or its connection is gone."""
        return self._stream.reset or self._stream.expired

    def time_remaining(self) -> float | None:
        """Seconds to the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def write(self, message) -> None:
        """Send one serialized response message (module docstring): bytes, or a list of
        buffers whose concatenation it is; a large one that fits the peer's windows goes to
        the socket gathered, without being joined or copied."""
        await self._conn.write_message(self._stream, message)


Handler = Callable[[bytes, ServerCall], Awaitable["bytes | None"]]


class RequestStream:
    """The request messages of a request-streaming call, as they come: ``await read()``
    gives the next one (bytes) or None once the client ended its side; ``async for`` too."""

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._closed = False

    def push(self, message: bytes) -> None:
        self._items.append(message)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes | None:
        while not self._items:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> bytes:
        message = await self.read()
        if message is None:
            raise StopAsyncIteration
        return message


@dataclass(frozen=True)
class StreamingRequests:
    """A method whose client sends a stream of messages (client- or bidi-streaming): the
    handler is ``async def handler(requests: RequestStream, call: ServerCall)`` and starts
    as soon as the call's headers came."""

    handler: Callable[[RequestStream, ServerCall], Awaitable[bytes | None]]


__all__ = ["HIGH_WATER", "GrpcError", "Handler", "RequestStream", "ServerCall",
           "StreamingRequests"]
