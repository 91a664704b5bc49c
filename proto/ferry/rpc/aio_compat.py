"""grpc.aio's server API over :class:`~ferry.rpc.server.GrpcServer`, for servicers
written for grpc.aio (generated ``add_*Servicer_to_server`` functions, generic handlers).

:class:`AioCompatServer` takes what a ``grpc.aio.Server`` takes (``add_generic_rpc_handlers``,
``add_registered_method_handlers``, ``add_insecure_port``, ``start``, ``stop``,
``wait_for_termination``) and serves every method kind: unary and server-streaming as
GrpcServer handlers, client- and bidi-streaming as :class:`StreamingRequests`. A handler's
behaviour gets a :class:`Context` with the part of ``grpc.aio.ServicerContext`` servicers use:
``abort``, ``read`` / ``write`` (streaming calls), ``cancelled``, ``add_done_callback`` (run
when the handler ends, however it ends), ``invocation_metadata``, ``peer``,
``time_remaining``, ``set_code`` / ``set_details``. A behaviour that is an async generator has
each item written as a message; a coroutine's result is the (last) response.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections import namedtuple
from collections.abc import Callable

import grpc

from ferry.rpc.call import GrpcError, RequestStream, ServerCall, StreamingRequests
from ferry.rpc.server import GrpcServer


class _Details(namedtuple("_Details", ("method", "invocation_metadata")),
               grpc.HandlerCallDetails):
    """What a generic handler's ``service()`` is asked about."""


class Context:
    """The ServicerContext subset of the module docstring, for one call."""

    def __init__(self, call: ServerCall, requests: RequestStream | None = None,
                 deserialize: Callable | None = None, serialize: Callable | None = None) -> None:
        self._call = call
        self._requests = requests
        self._deserialize = deserialize
        self._serialize = serialize
        self._callbacks: list[Callable] = []
        self._code: grpc.StatusCode | None = None
        self._details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        raise GrpcError(code.value[0], details)

    async def read(self):
        message = await self._requests.read()
        if message is None:
            return grpc.aio.EOF
        return self._deserialize(message) if self._deserialize else message

    async def write(self, message) -> None:
        await self._call.write(self._serialize(message) if self._serialize else message)

    def cancelled(self) -> bool:
        return self._call.cancelled()

    def done(self) -> bool:
        return self._call.cancelled()

    def add_done_callback(self, callback: Callable) -> None:
        self._callbacks.append(callback)

    def invocation_metadata(self):
        return self._call.metadata

    def peer(self) -> str:
        host = self._call.peer.rpartition(":")[0]
        return f"ipv6:[{host}]:{self._call.peer.rpartition(':')[2]}" if ":" in host \
            else f"ipv4:{self._call.peer}"

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def _ended(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def _status(self) -> None:
        """A code set with set_code (not OK) ends the call with it, as grpc.aio does."""
        if self._code is not None and self._code is not grpc.StatusCode.OK:
            raise GrpcError(self._code.value[0], self._details)


def _adapt(h: grpc.RpcMethodHandler):
    """A GrpcServer handler running a grpc.aio method handler's behaviour."""
    deser, ser = h.request_deserializer, h.response_serializer

    def out(message) -> bytes:
        return ser(message) if ser else message

    async def respond(behaviour, request, call: ServerCall, ctx: Context):
        try:
            result = behaviour(request, ctx)
            if inspect.isasyncgen(result):
                async for item in result:
                    await call.write(out(item))
                value = None
            elif inspect.isawaitable(result):
                value = await result
            elif inspect.isgenerator(result):  # a plain (sync) streaming behaviour
                for item in result:
                    await call.write(out(item))
                value = None
            else:  # a plain (sync) behaviour, e.g. a generated servicer's unimplemented one
                value = result
        except GrpcError:
            raise
        except Exception as exc:  # a code set before the failure is the answer, as grpc.aio
            if ctx._code is not None and ctx._code is not grpc.StatusCode.OK:
                raise GrpcError(ctx._code.value[0], ctx._details) from exc
            raise
        ctx._status()
        return None if value is None else out(value)

    if not h.request_streaming:
        behaviour = h.unary_stream if h.response_streaming else h.unary_unary

        async def unary(data: bytes, call: ServerCall):
            ctx = Context(call, serialize=ser)
            try:
                return await respond(behaviour, deser(data) if deser else data, call, ctx)
            finally:
                ctx._ended()
        return unary

    behaviour = h.stream_stream if h.response_streaming else h.stream_unary

    async def streaming(requests: RequestStream, call: ServerCall):
        ctx = Context(call, requests, deser, ser)

        async def request_iterator():
            async for data in requests:
                yield deser(data) if deser else data
        try:
            return await respond(behaviour, request_iterator(), call, ctx)
        finally:
            ctx._ended()
    return StreamingRequests(streaming)


class AioCompatServer:
    """grpc.aio.Server's methods (module docstring) on a GrpcServer."""

    def __init__(self, *, max_receive_message_length: int = 4 << 20) -> None:
        self._generic: list = []
        self._server = GrpcServer({}, max_receive_message_length=max_receive_message_length,
                                  resolve=self._resolve)
        self._socks: list[socket.socket] = []
        self._stopped = asyncio.Event()

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        for name, h in handlers.items():
            self._server.methods[f"/{service}/{name}"] = _adapt(h)

    def _resolve(self, path: str):
        for g in self._generic:
            h = g.service(_Details(path, ()))
            if h is not None:
                return _adapt(h)
        return None

    def add_insecure_port(self, address: str) -> int:
        """Bind ``host:port`` now (0: a free port); returns the port, 0 when it cannot."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.listen(1024)
        except OSError:
            sock.close()
            return 0
        sock.setblocking(False)
        self._socks.append(sock)
        return sock.getsockname()[1]

    async def start(self) -> None:
        if not self._socks:
            raise RuntimeError("add_insecure_port first")
        await self._server.start_on(*self._socks)

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(3600.0 if grace is None else grace)
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


__all__ = ["AioCompatServer", "Context"]
