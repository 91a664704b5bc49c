"""Runs a :class:`Frontend`'s three APIs on their ports: OpenAI HTTP (aiohttp), the ferry.v1
gRPC API (:class:`ferry.rpc.GrpcServer`) and the KServe v2 gRPC API (grpc.aio),
plus a background task that polls the workers' Stats (readiness, KV block gauges).

A port of 0 binds a free port; ``None`` leaves that API off. ``start`` returns the ports
actually bound. With ``reuse_port=True`` several frontend processes may bind the same ports
(SO_REUSEPORT: the kernel spreads connections over them), the way to use more than one core;
without it, binding a port in use fails. The server does not own the frontend: ``stop``
leaves its worker channels open (``Frontend.close`` closes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Self

import grpc
from aiohttp import web

from ferry.rpc import GrpcServer
from orchestrator.frontend import grpc_api, kserve
from orchestrator.frontend.core import Frontend
from orchestrator.frontend.openai_http import OpenAIHttpApi

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BoundPorts:
    http: int | None
    grpc: int | None
    kserve: int | None


class FrontendServer:
    def __init__(self, frontend: Frontend, *, host: str = "127.0.0.1",
                 http_port: int | None = 0, grpc_port: int | None = 0,
                 kserve_port: int | None = 0, stats_interval_s: float | None = 1.0,
                 shutdown_grace_s: float = 2.0, reuse_port: bool = False) -> None:
        for name, port in (("http_port", http_port), ("grpc_port", grpc_port),
                           ("kserve_port", kserve_port)):
            if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                     or not 0 <= port <= 65535):
                raise ValueError(f"{name} must be in 0..65535 (0: a free port) or None (off), "
                                 f"got {port!r}")
        if stats_interval_s is not None and not stats_interval_s > 0:
            raise ValueError(f"stats_interval_s must be > 0 or None (no polling), got "
                             f"{stats_interval_s!r}")
        if not shutdown_grace_s >= 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {shutdown_grace_s!r}")
        self.frontend = frontend
        self._grace_s = float(shutdown_grace_s)
        self._reuse_port = bool(reuse_port)
        self.host = host
        self._want = BoundPorts(http_port, grpc_port, kserve_port)
        self._stats_interval_s = stats_interval_s
        self._runner: web.AppRunner | None = None
        self._grpc: list[grpc.aio.Server] = []
        self._ferry: GrpcServer | None = None
        self._poller: asyncio.Task | None = None
        self.ports: BoundPorts | None = None

    async def start(self) -> BoundPorts:
        if self.ports is not None:
            raise RuntimeError("the frontend server is already started")
        try:
            http = await self._start_http() if self._want.http is not None else None
            ferry = await self._start_ferry() if self._want.grpc is not None else None
            ks = await self._start_grpc(self._want.kserve, kserve.add_to_server) \
                if self._want.kserve is not None else None
        except BaseException:
            await self._shutdown(0)
            raise
        if self._stats_interval_s is not None:
            self._poller = asyncio.create_task(self._poll_stats(self._stats_interval_s))
        self.ports = BoundPorts(http, ferry, ks)
        return self.ports

    async def stop(self) -> None:
        """Stop accepting requests; in-flight ones get ``shutdown_grace_s`` seconds, then are
        cancelled (which cancels their worker calls)."""
        await self._shutdown(self._grace_s)
        self.ports = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _start_http(self) -> int:
        app = OpenAIHttpApi(self.frontend).app()
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self._grace_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._want.http, reuse_port=self._reuse_port)
        await site.start()
        return self._runner.addresses[0][1]

    async def _start_ferry(self) -> int:
        self._ferry = GrpcServer(grpc_api.FerryService(self.frontend).methods())
        return await self._ferry.start(self.host, self._want.grpc, reuse_port=self._reuse_port)

    async def _start_grpc(self, port: int, add) -> int:
        # grpc enables SO_REUSEPORT by default, which would let a second server bind a port in use.
        server = grpc.aio.server(options=(("grpc.so_reuseport", int(self._reuse_port)),))
        add(self.frontend, server)
        self._grpc.append(server)
        try:
            bound = server.add_insecure_port(f"{self.host}:{port}")
        except RuntimeError as e:
            raise OSError(f"cannot bind {self.host}:{port} ({e}); choose another port") from None
        if bound == 0:
            raise OSError(f"cannot bind {self.host}:{port}; choose another port")
        await server.start()
        return bound

    async def _shutdown(self, grace_s: float) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        servers, self._grpc = self._grpc, []
        if self._ferry is not None:
            servers.append(self._ferry)
            self._ferry = None
        await asyncio.gather(*(s.stop(grace_s) for s in servers))
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _poll_stats(self, interval_s: float) -> None:
        while True:
            try:
                await self.frontend.refresh_worker_stats()
            except Exception:  # keep polling; a bug here must not take the server down
                log.exception("polling worker stats failed")
            await asyncio.sleep(interval_s)


__all__ = ["BoundPorts", "FrontendServer"]
