"""A gRPC server on asyncio: HTTP/2 and the gRPC wire format implemented here (connection.py),
handlers as in call.py (one request message: unary and server-streaming; a stream of them:
:class:`~ferry.rpc.call.StreamingRequests`). grpc.aio servicers run on it through
aio_compat.py.

Why not grpc.aio: each operation of a grpc.aio call (accept, read the request, every message,
the status) completes on grpc's own poller thread and wakes the event loop through a socket;
at 1,000 calls/s that costs ~0.4 ms of CPU per call, several times what the call's work
costs. Here a call is parsed, run and answered on the event loop itself (~0.09 ms of CPU a
call for the same two-message stream; benchmarks/serve_overhead.py). It is plain-text HTTP/2
(h2c, prior knowledge) as every gRPC client speaks it with insecure channel credentials; TLS
is not offered. Standard clients (grpcio, grpc.aio, the
generated stubs) call it as any gRPC server.

Use::

    server = GrpcServer({"/pkg.Service/Method": handler, ...})
    port = await server.start("127.0.0.1", 0)   # 0: a free port
    ...
    await server.stop(grace_s=2.0)

``stop`` stops listening and sends every connection GOAWAY (running calls go on; new ones are
refused, and clients retry refused calls on a new connection), waits up to ``grace_s`` for the
running calls, then ends those left with UNAVAILABLE and closes the connections.
``reuse_port=True`` lets several processes listen on one port (SO_REUSEPORT); without it a
port in use is an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from ferry.rpc.call import Handler, StreamingRequests
from ferry.rpc.connection import H2Connection

DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024  # as grpc's default
DEFAULT_MAX_STREAMS = 1024


class GrpcServer:
    def __init__(self, methods: Mapping[str, Handler | StreamingRequests], *,
                 max_receive_message_length: int = DEFAULT_MAX_RECEIVE,
                 max_concurrent_streams: int = DEFAULT_MAX_STREAMS,
                 resolve: Callable[[str], Handler | StreamingRequests | None] | None = None,
                 ) -> None:
        for path in methods:
            if not (path.startswith("/") and path.count("/") == 2):
                raise ValueError(f"a method path is /package.Service/Method, got {path!r}")
        if max_receive_message_length < 1:
            raise ValueError(f"max_receive_message_length must be >= 1, got "
                             f"{max_receive_message_length!r}")
        if max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1, got "
                             f"{max_concurrent_streams!r}")
        self.methods = dict(methods)
        self._resolve = resolve
        self.max_receive_message_length = int(max_receive_message_length)
        self.max_concurrent_streams = int(max_concurrent_streams)
        self.connections: set[H2Connection] = set()
        self.stopping = False
        self._listeners: list[asyncio.base_events.Server] = []

    def handler(self, path: str):
        """The handler of ``path``: from ``methods``, else ``resolve(path)`` (kept), or None."""
        handler = self.methods.get(path)
        if handler is None and self._resolve is not None:
            handler = self._resolve(path)
            if handler is not None:
                self.methods[path] = handler
        return handler

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: a free port); returns the port bound."""
        if self._listeners:
            raise RuntimeError("the server is already started")
        loop = asyncio.get_running_loop()
        self.stopping = False
        try:
            listener = await loop.create_server(lambda: H2Connection(self), host, port,
                                                reuse_port=reuse_port or None)
        except OSError as e:
            raise OSError(e.errno, f"cannot bind {host}:{port} ({e.strerror}); choose another "
                                   f"port") from None
        self._listeners.append(listener)
        return listener.sockets[0].getsockname()[1]

    async def start_on(self, *socks) -> int:
        """Serve on sockets already bound and listening; returns the first one's port."""
        if self._listeners:
            raise RuntimeError("the server is already started")
        self.stopping = False
        loop = asyncio.get_running_loop()
        for sock in socks:
            self._listeners.append(await loop.create_server(lambda: H2Connection(self),
                                                            sock=sock))
        return socks[0].getsockname()[1]

    async def stop(self, grace_s: float = 0.0) -> None:
        """GOAWAY, ``grace_s`` seconds for running calls, then close (module docstring)."""
        self.stopping = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connections):
            conn.begin_shutdown()
        tasks = [t for conn in self.connections for t in conn.running_tasks()]
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for conn in list(self.connections):
            conn.abort_pending()
        tasks = [t for t in tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        if conns:  # their connection_lost runs in a later loop iteration
            await asyncio.wait([c.lost for c in conns], timeout=1.0)
        self._listeners = []


__all__ = ["DEFAULT_MAX_RECEIVE", "DEFAULT_MAX_STREAMS", "GrpcServer"]
