"""The workers a frontend sends requests to: one gRPC channel and ``ferry.v1.Worker`` stub per
worker, reused by every request (a channel multiplexes all calls over one HTTP/2 connection).

Lifecycle: :meth:`WorkerPool.add` opens the channel and calls ``Worker.Info`` (a worker that
does not answer is not added); :meth:`WorkerPool.remove` closes the channel, which cancels the
worker's in-flight calls (their streams end with an error chunk). A worker is *ready* while
its last Info / Stats call succeeded; only ready workers are offered to the picker.
Requests go through :meth:`WorkerHandle.generate`: over the worker's GenerateStream
(orchestrator/frontend/worker_stream.py), or a Generate call where it has none.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from ferry.rpc.client import BidiCall
from ferry.v1 import worker_pb2, worker_pb2_grpc
from orchestrator.frontend.worker_stream import WorkerStream

# Keepalive so that a dead worker's connection is noticed while a stream waits on it.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def generate_stream(address: str):
    """``open_call`` for a worker's :class:`WorkerStream`: a GenerateStream call on its own
    HTTP/2 connection, served on the event loop (proto/ferry/rpc/client.py)."""
    def open_call() -> BidiCall:
        return BidiCall(address, "/ferry.v1.Worker/GenerateStream",
                        worker_pb2.GenerateStreamRequest.SerializeToString,
                        worker_pb2.GenerateStreamResponse.FromString)
    return open_call


class WorkerUnreachable(ConnectionError):
    """A worker did not answer Info at registration; the message says which and why."""


@dataclass
class WorkerHandle:
    worker_id: str
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    info: worker_pb2.InfoResponse
    ready: bool = True
    stats: worker_pb2.StatsResponse | None = None  # the last Stats answer
    stream: WorkerStream | None = None  # requests go over its GenerateStream when it has one

    def generate(self, request: worker_pb2.WorkerGenerateRequest):
        """Start a request on this worker; iterate the result like a Generate call."""
        if self.stream is None:
            return self.stub.Generate(request)
        return self.stream.generate(request)


class WorkerPool:
    def __init__(self, timeout_s: float = 5.0) -> None:
        self._workers: dict[str, WorkerHandle] = {}
        self._ready: tuple[str, ...] = ()
        self.timeout_s = timeout_s

    async def add(self, worker_id: str, address: str) -> WorkerHandle:
        """Connect to the worker at ``host:port`` and read its Info."""
        if not worker_id:
            raise ValueError("worker_id must be a non-empty string")
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} is already registered; remove it first")
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = worker_pb2_grpc.WorkerStub(channel)
        try:
            info = await stub.Info(worker_pb2.InfoRequest(), timeout=self.timeout_s,
                                   wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            await channel.close()
            raise WorkerUnreachable(
                f"worker {worker_id!r} at {address} did not answer Info "
                f"({e.code().name}: {e.details()}); check that it is running") from None
        handle = WorkerHandle(worker_id, address, channel, stub, info,
                              stream=WorkerStream(stub, worker_id, generate_stream(address)))
        self._workers[worker_id] = handle
        self._refresh_ready()
        return handle

    async def remove(self, worker_id: str, grace_s: float | None = None) -> bool:
        """Forget a worker and close its channel; False when it was not registered."""
        handle = self._workers.pop(worker_id, None)
        if handle is None:
            return False
        self._refresh_ready()
        if handle.stream is not None:
            await handle.stream.close()
        await handle.channel.close(grace_s)
        return True

    def get(self, worker_id: str) -> WorkerHandle:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise KeyError(f"worker {worker_id!r} is not registered") from None

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    def handles(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    @property
    def ready_ids(self) -> tuple[str, ...]:
        """Ready workers, in registration order (cached; rebuilt when readiness changes)."""
        return self._ready

    def set_ready(self, worker_id: str, ready: bool) -> None:
        handle = self._workers.get(worker_id)
        if handle is not None and handle.ready != ready:
            handle.ready = ready
            self._refresh_ready()

    async def poll_stats(self) -> dict[str, worker_pb2.StatsResponse]:
        """Call Stats on every worker at once; a worker that fails it is marked not ready (and
        ready again once it answers)."""
        handles = list(self._workers.values())
        results = await asyncio.gather(*(self._stats(h) for h in handles))
        return {h.worker_id: s for h, s in zip(handles, results) if s is not None}

    async def _stats(self, handle: WorkerHandle) -> worker_pb2.StatsResponse | None:
        try:
            stats = await handle.stub.Stats(worker_pb2.StatsRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            self.set_ready(handle.worker_id, False)
            return None
        handle.stats = stats
        self.set_ready(handle.worker_id, True)
        return stats

    async def close(self) -> None:
        for worker_id in list(self._workers):
            await self.remove(worker_id)

    def _refresh_ready(self) -> None:
        self._ready = tuple(w for w, h in self._workers.items() if h.ready)


__all__ = ["CHANNEL_OPTIONS", "WorkerHandle", "WorkerPool", "WorkerUnreachable"]
