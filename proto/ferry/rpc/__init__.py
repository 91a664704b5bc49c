"""gRPC over HTTP/2 on asyncio, without grpc.aio: see server.py (why, and how to use it)."""

from ferry.rpc.call import GrpcError, Handler, ServerCall
from ferry.rpc.frames import Status
from ferry.rpc.server import GrpcServer

__all__ = ["GrpcError", "GrpcServer", "Handler", "ServerCall", "Status"]
