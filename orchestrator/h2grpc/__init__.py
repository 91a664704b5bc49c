"""gRPC over HTTP/2 on asyncio, without grpc.aio: see server.py (why, and how to use it)."""

from orchestrator.h2grpc.call import GrpcError, Handler, ServerCall
from orchestrator.h2grpc.frames import Status
from orchestrator.h2grpc.server import GrpcServer

__all__ = ["GrpcError", "GrpcServer", "Handler", "ServerCall", "Status"]
