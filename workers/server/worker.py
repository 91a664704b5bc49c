"""One worker process's serving side: the Worker gRPC service and its event publishing.

:class:`WorkerServer` wraps any :class:`~workers.engine.engine.LLMEngine` (torch runner or
mocker) in an :class:`~workers.server.async_engine.AsyncEngine` and serves
``ferry.v1.Worker`` and ``ferry.v1.KvTransfer`` on ``host:port`` (port 0: the OS picks a free
port; :meth:`WorkerServer.start` returns the bound address) with grpc.aio servicers run by
:class:`ferry.rpc.aio_compat.AioCompatServer` (HTTP/2 on the event loop).

Event plane (only when ``nats_url`` is set), through
``workers.server.event_publisher.EventPublisher`` (imported lazily; it connects in the
background and never blocks serving when NATS is down):

- KV events: the engine thread's ``on_step`` hook queues each step's ``KvEventBatch``; one
  publisher task on the event loop sends them in step order (so the per-worker ``seq``
  numbers reach NATS without reordering; the publisher queues and retries them itself).
- Load: every ``load_report_interval_s`` a task reads the engine's load on the engine thread
  and publishes a :class:`kvcache.wire.LoadReport` when it changed since the last report, and
  at least every ``load_heartbeat_s`` anyway (an idle worker stays visible). Timestamps are on
  the engine's clock, like the KV event batches.

Shutdown (:meth:`WorkerServer.stop`): stop taking calls; give in-flight streams ``grace``
seconds to finish; then stop the engine, which ends any stream still running with an ABORTED
error chunk; flush the queued KV events and close the publisher; unlink the KV arena (or
CUDA-IPC export) this worker's handles named (workers/server/kv_transport.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import re
import time
from collections import deque
from dataclasses import dataclass

from ferry.rpc.aio_compat import AioCompatServer
from ferry.v1 import worker_pb2_grpc
from kvcache.events import KvEventBatch
from kvcache.transfer.grpc_transport import KvTransferServicer
from kvcache.transfer.shm import SharedKvArena
from kvcache.wire import LoadReport
from workers.engine.engine import LLMEngine, StepResult
from workers.server.async_engine import AsyncEngine
from workers.server.disagg import HandleTable, KvImporter, cache_view
from workers.server.kv_transport import HolderTransport, check_kv_transport, holder_transport
from workers.server.worker_service import WorkerService

log = logging.getLogger(__name__)

_WORKER_ID = re.compile(r"[A-Za-z0-9_-]+")


class WorkerRole(str, enum.Enum):
    AGGREGATED = "aggregated"  # prefill and decode in one worker
    PREFILL = "prefill"
    DECODE = "decode"


WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")  # binds that listen on every interface
# What a worker's server accepts in one message (kvcache's SERVER_OPTIONS say the same to a
# grpc.aio server holding KV).
MAX_RECEIVE = 64 << 20


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """How one worker serves; validated when built (errors say what to change)."""

    worker_id: str
    model: str  # the served model name (Info.model)
    role: WorkerRole = WorkerRole.AGGREGATED  # a WorkerRole or its value ("prefill", ...)
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    # the host others dial (frontends, decode workers pulling KV); None: ``host``, or
    # 127.0.0.1 for a wildcard bind (0.0.0.0 / ::), which only suits one machine
    advertise_host: str | None = None
    nats_url: str | None = None  # None: publish no events
    load_report_interval_s: float = 0.1  # at most one load report per interval
    load_heartbeat_s: float = 1.0  # a load report at least this often, changed or not
    # Generate streams send at most one chunk per interval (the last one at once; the first is
    # never held); tokens produced meanwhile share the next chunk. 0: one chunk per engine step.
    # Every chunk costs the frontend and the client a message (~0.1 ms of CPU each): at 20 ms a
    # fast engine's 16-token answer streams in 2-4 chunks instead of 5-11 at 5 ms, and 50
    # updates a second stay smooth to a reader (benchmarks/serve_overhead.py).
    stream_interval_s: float = 0.02
    # Disaggregation (workers/server/disagg.py): a KV handle nobody released is released after
    # kv_handle_ttl_s; a decode worker gives a pull kv_pull_timeout_s, then prefills locally.
    kv_handle_ttl_s: float = 60.0
    kv_pull_timeout_s: float = 30.0
    # How KV blocks move (workers/server/kv_transport.py): "auto" (default: shared memory when
    # this worker's caches are in a SharedKvArena and the puller is on the same host, CUDA IPC
    # for GPU caches, gRPC otherwise), "grpc", "shm" or "cuda-ipc". A puller set to "grpc"
    # always pulls over gRPC.
    kv_transport: str = "auto"

    def __post_init__(self) -> None:
        check_kv_transport(self.kv_transport)
        if not isinstance(self.worker_id, str) or not _WORKER_ID.fullmatch(self.worker_id):
            raise ValueError(f"worker_id must be letters, digits, '-' and '_' only (it names "
                             f"NATS subjects), e.g. 'decode-0'; got {self.worker_id!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be the served model name, got {self.model!r}")
        try:
            object.__setattr__(self, "role", WorkerRole(self.role))
        except ValueError:
            raise ValueError(f"role must be one of {[r.value for r in WorkerRole]}, "
                             f"got {self.role!r}") from None
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be an interface address such as '127.0.0.1', "
                             f"got {self.host!r}")
        if self.advertise_host is not None and (not isinstance(self.advertise_host, str)
                                                or not self.advertise_host
                                                or self.advertise_host in WILDCARD_HOSTS):
            raise ValueError(f"advertise_host must be an address other machines reach this "
                             f"worker at (such as '10.0.0.5'), or None; got "
                             f"{self.advertise_host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0 picks a free port), got {self.port!r}")
        if self.nats_url is not None and (not isinstance(self.nats_url, str)
                                          or "://" not in self.nats_url):
            raise ValueError(f"nats_url must look like 'nats://127.0.0.1:4222' or be None, "
                             f"got {self.nats_url!r}")
        if isinstance(self.stream_interval_s, bool) \
                or not isinstance(self.stream_interval_s, (int, float)) \
                or not 0 <= self.stream_interval_s <= 1:
            raise ValueError(f"stream_interval_s must be a number of seconds in [0, 1] (0: a "
                             f"chunk per engine step), got {self.stream_interval_s!r}")
        for name in ("load_report_interval_s", "load_heartbeat_s", "kv_handle_ttl_s",
                     "kv_pull_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.load_heartbeat_s < self.load_report_interval_s:
            raise ValueError(
                f"load_heartbeat_s ({self.load_heartbeat_s}) must be >= load_report_interval_s "
                f"({self.load_report_interval_s})")


def build_load_report(worker_id: str, engine: LLMEngine) -> LoadReport:
    """The engine's load now; call it on the engine thread."""
    stats = engine.stats()
    sched, kv = engine.scheduler, engine.kv
    decode_blocks = 0
    for rid in sched.running_ids():
        req = sched.get(rid)
        if req is not None and req.prefill_done:
            decode_blocks += len(kv.block_table(rid))
    return LoadReport(
        worker_id=worker_id, timestamp=engine.runner.now(), waiting=stats.num_waiting,
        running=stats.num_running, kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_total=stats.kv_blocks_total,
        active_prefill_tokens=stats.num_active_prefill_tokens,
        active_decode_blocks=decode_blocks)


def _same_load(a: LoadReport, b: LoadReport) -> bool:
    return (a.waiting, a.running, a.kv_blocks_used, a.active_prefill_tokens,
            a.active_decode_blocks) == (b.waiting, b.running, b.kv_blocks_used,
                                        b.active_prefill_tokens, b.active_decode_blocks)


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return f"{host}:{port}"


def _dial_address(host: str, port: int, advertise_host: str | None = None) -> str:
    """Where clients dial a server bound to ``host``: ``advertise_host`` when given, else
    ``host`` (a wildcard bind is reachable on loopback from this machine)."""
    if advertise_host is not None:
        host = advertise_host
    elif host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    return _host_port(host, port)


class _EventForwarder:
    """Moves KV event batches from the engine thread to the publisher, in order."""

    def __init__(self, publisher, loop: asyncio.AbstractEventLoop) -> None:
        self._publisher = publisher
        self._loop = loop
        self._queue: deque[KvEventBatch] = deque()
        self._wake = asyncio.Event()
        self._sleeping = False
        self._stopping = False
        self.num_published = 0
        self.num_failed = 0

    def on_step(self, result: StepResult) -> None:  # engine thread
        if result.kv_events is None:
            return
        self._queue.append(result.kv_events)
        if self._sleeping:
            self._sleeping = False
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # loop closed
                pass

    async def run(self) -> None:
        while True:
            self._sleeping = True
            if not self._queue:
                if self._stopping:
                    return
                await self._wake.wait()
                self._wake.clear()
            self._sleeping = False
            while self._queue:
                batch = self._queue.popleft()
                try:
                    await self._publisher.publish_kv(batch)
                    self.num_published += 1
                except Exception:  # an encoding bug: logged, the batch is skipped
                    self.num_failed += 1
                    log.exception("publishing KV event batch %d failed", batch.seq)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()


class WorkerServer:
    """The Worker gRPC server (and event publishing) of one engine."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig, *,
                 kv_arena: SharedKvArena | None = None) -> None:
        """``kv_arena``: the shared-memory arena holding the engine's KV caches (see
        workers/server/kv_transport.py); the server owns it from here and unlinks it when it
        stops (or when start fails)."""
        if not isinstance(engine, LLMEngine):
            raise TypeError(f"WorkerServer serves an LLMEngine, got {type(engine).__name__}")
        if not isinstance(config, WorkerConfig):
            raise TypeError(f"config must be a WorkerConfig, got {type(config).__name__}")
        self.engine = engine
        self.config = config
        self.kv_arena = kv_arena
        self.holder: HolderTransport | None = None  # what this worker's handles advertise
        self.aengine: AsyncEngine | None = None
        self.address: str | None = None
        self._server: AioCompatServer | None = None
        self._service: WorkerService | None = None
        self._publisher = None
        self._forwarder: _EventForwarder | None = None
        self._forwarder_task: asyncio.Task | None = None
        self._load_task: asyncio.Task | None = None
        self.handles: HandleTable | None = None  # KV handles this worker hands out
        self.importer: KvImporter | None = None  # KV pulls this worker makes
        self._kv_transfer: KvTransferServicer | None = None

    async def start(self) -> str:
        """Bind and serve; return the address clients dial ("127.0.0.1:PORT")."""
        if self._server is not None:
            raise RuntimeError("this WorkerServer was already started; build a new one")
        cfg = self.config
        loop = asyncio.get_running_loop()
        try:
            self.holder = holder_transport(cfg.kv_transport, cache_view(self.engine),
                                           self.kv_arena, cfg.worker_id, cfg.role.value)
        except BaseException:
            if self.kv_arena is not None:
                self.kv_arena.close()
            raise
        if cfg.nats_url is not None:
            await self._start_publisher(loop)
        on_step = self._forwarder.on_step if self._forwarder is not None else None
        self.aengine = AsyncEngine(self.engine, on_step=on_step)
        self.handles = HandleTable(self.aengine, cfg.worker_id, cfg.kv_handle_ttl_s)
        self.importer = KvImporter(self.aengine, cfg.kv_pull_timeout_s,
                                   grpc_only=cfg.kv_transport == "grpc")
        # ferry.rpc, not grpc.aio: its calls are read and written on this loop instead of
        # through grpc's poller thread (benchmarks/serve_overhead.py: the added latency at
        # 1,000 requests/s about halves); the servicers are grpc.aio's, unchanged.
        server = AioCompatServer(max_receive_message_length=MAX_RECEIVE)
        self._service = WorkerService(self.aengine, cfg.worker_id, cfg.model, cfg.role.value,
                                      stream_interval_s=cfg.stream_interval_s,
                                      handles=self.handles, importer=self.importer)
        worker_pb2_grpc.add_WorkerServicer_to_server(self._service, server)
        self._kv_transfer = KvTransferServicer(self.handles.registry, self.importer.view,
                                               gather=True)  # ferry.rpc writes them as is
        self._kv_transfer.add_to_server(server)
        bind = _host_port(cfg.host, cfg.port)
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            port = 0
            log.debug("binding %s failed: %s", bind, exc)
        if not port:
            await self._cleanup()
            raise OSError(f"could not bind the worker's gRPC server to {bind}; choose a free "
                          "port, or port 0 to let the system pick one")
        self._server = server
        await server.start()
        self.address = _dial_address(cfg.host, port, cfg.advertise_host)
        self.handles.start(transport_address=self.holder.address(self.address))
        if self._publisher is not None:
            self._load_task = loop.create_task(self._report_load())
        log.info("worker %s serving %s (%s) on %s, KV handles over %s", cfg.worker_id,
                 cfg.model, cfg.role.value, self.address, self.holder.scheme)
        return self.address

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; in-flight streams get ``grace`` seconds, then end with an error."""
        server = self._server
        if server is None:
            await self._cleanup()
            return
        self._service.drain()  # GenerateStream calls take no new requests from here on
        stopping = asyncio.ensure_future(server.stop(None if grace is None else grace + 1.0))
        if grace is not None:
            await asyncio.wait({stopping}, timeout=grace)
        await self._cleanup()  # ends streams still running with a final error chunk
        await stopping
        self._server = None

    # ---------------------------------------------------------------- internals

    async def _start_publisher(self, loop: asyncio.AbstractEventLoop) -> None:
        from workers.server.event_publisher import EventPublisher  # lazy: needs nats-py

        cfg = self.config
        publisher = EventPublisher(cfg.nats_url, cfg.worker_id)
        await publisher.connect()  # connects in the background; never fails for NATS down
        self._publisher = publisher
        self._forwarder = _EventForwarder(publisher, loop)
        self._forwarder_task = loop.create_task(self._forwarder.run())

    async def _report_load(self) -> None:
        cfg, aengine, publisher = self.config, self.aengine, self._publisher
        last: LoadReport | None = None
        last_sent = 0.0
        while True:
            try:
                report = await aengine.call(
                    lambda eng: build_load_report(cfg.worker_id, eng))
            except RuntimeError:  # engine shut down
                return
            now = time.monotonic()
            if last is None or not _same_load(report, last) \
                    or now - last_sent >= cfg.load_heartbeat_s:
                try:
                    await publisher.publish_load(report)
                    last, last_sent = report, now
                except Exception:  # try again next interval
                    log.exception("publishing the load report failed")
            await asyncio.sleep(cfg.load_report_interval_s)

    async def _cleanup(self) -> None:
        if self.importer is not None:
            await self.importer.close()
        if self.handles is not None:
            await self.handles.close()  # releases every handle still out
        if self._kv_transfer is not None:
            await asyncio.to_thread(self._kv_transfer.close)
            self._kv_transfer = None
        if self.aengine is not None:
            await asyncio.to_thread(self.aengine.shutdown)
        if self.holder is not None:
            self.holder.close()  # unlinks the shared-memory arena / CUDA-IPC export
        if self.kv_arena is not None:
            self.kv_arena.close()  # (a server stopped before it started)
        load_task, self._load_task = self._load_task, None
        if load_task is not None:
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
        forwarder_task, self._forwarder_task = self._forwarder_task, None
        if forwarder_task is not None:
            self._forwarder.stop()  # publish what the engine queued, then end
            try:
                await asyncio.wait_for(forwarder_task, timeout=5.0)
            except TimeoutError:
                log.warning("KV events still unpublished at shutdown were dropped")
        if self._publisher is not None:
            try:
                await self._publisher.close()  # sends what is queued (bounded), disconnects
            except Exception:
                log.exception("closing the event publisher failed")
            self._publisher = None


__all__ = ["WILDCARD_HOSTS", "WorkerConfig", "WorkerRole", "WorkerServer", "build_load_report"]
