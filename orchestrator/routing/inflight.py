"""In-flight load shared between router replicas over NATS.

Each frontend replica routes with its own router; without sharing, a replica would see only the
requests it sent itself until the workers' next load reports, and several replicas routing in
the same instant would all pile onto the same "idle" worker. So each replica tells the others
what it routed.

Protocol, on core NATS subject ``ferry.router.inflight`` (no persistence: a replica that starts
late misses earlier messages, and the workers' load reports cover those requests anyway):

=====================  ==========================================  =============================
message                the sending replica, when                   every other replica
=====================  ==========================================  =============================
``routed``             it sent request ``id`` to ``worker`` with   ``LoadView.on_routed(worker,
(worker, prefill,      ``prefill`` uncached prompt blocks and      "<replica>/<id>", prefill,
decode blocks)         ``decode`` blocks it will hold              decode)`` when it knows the
                                                                   worker and the key is new
``prefill_done``       the request's first token came back         ``on_prefill_done(key)``
``finished``           the request ended (any way, a retry on      ``on_finished(key)``
                       another worker included)
=====================  ==========================================  =============================

A replica ignores its own messages (same ``replica_id``). The key is prefixed with the sender's
replica id, so two replicas' request ids never collide in a LoadView. An entry whose
``finished`` never arrives (the sender died, a message was lost) stops counting at its
worker's next load report, like the replica's own entries (the covering rule of
:mod:`router.load`): the error is bounded by the report period plus ``load_grace_s``.

Wire form: a compact JSON array ``[replica_id, kind, request_id, worker_id, prefill, decode]``
(the last three are ``""``, 0, 0 for ``prefill_done`` and ``finished``). A message that does
not decode is logged and skipped.

:class:`PeerLink` is this replica's end: one NATS connection (kept up by
:class:`workers.server.nats_link.NatsLink`), a subscription to the subject (and to the
workers' load reports when asked: the ``approx`` mode takes no KV events, so it has no
EventSubscriber), and a sender task: :meth:`PeerLink.publish` never waits for NATS; while the
connection is down, messages wait in a bounded queue (oldest dropped first). Callbacks run on
the event loop that called :meth:`PeerLink.start`. With ``on_update=None`` it does not
subscribe to the subject (a replica that does not share in-flight load, but still wants the
connection: for load reports, or for stream queries).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from kvcache.wire import LoadReport, decode_load_report
from router.load import LoadView
from workers.server.nats_link import DEFAULT_BACKOFF, LOAD_SUBJECTS, Backoff, NatsLink

logger = logging.getLogger(__name__)

INFLIGHT_SUBJECT = "ferry.router.inflight"
_MAX_QUEUED = 4096


class InflightKind(str, enum.Enum):
    ROUTED = "routed"
    PREFILL_DONE = "prefill_done"
    FINISHED = "finished"


def _count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"InflightUpdate.{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class InflightUpdate:
    """One message of the protocol above."""

    replica_id: str
    kind: InflightKind
    request_id: str
    worker_id: str = ""  # ROUTED only
    prefill_blocks: int = 0  # ROUTED only
    decode_blocks: int = 0  # ROUTED only

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", InflightKind(self.kind))
        for name in ("replica_id", "request_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"InflightUpdate.{name} must be a non-empty string, got "
                                 f"{value!r}")
        if not isinstance(self.worker_id, str):
            raise TypeError(f"InflightUpdate.worker_id must be a string, got "
                             f"{self.worker_id!r}")
        if self.kind is InflightKind.ROUTED and not self.worker_id:
            raise ValueError("a 'routed' InflightUpdate must name its worker_id")
        _count("prefill_blocks", self.prefill_blocks)
        _count("decode_blocks", self.decode_blocks)

    @property
    def key(self) -> str:
        """The request's key in another replica's LoadView."""
        return f"{self.replica_id}/{self.request_id}"


def encode_update(update: InflightUpdate) -> bytes:
    return json.dumps([update.replica_id, update.kind.value, update.request_id, update.worker_id,
                       update.prefill_blocks, update.decode_blocks],
                      separators=(",", ":")).encode()


def decode_update(data: bytes) -> InflightUpdate:
    """Bytes -> InflightUpdate; ValueError when they are not one."""
    try:
        fields = json.loads(data)
        if not isinstance(fields, list) or len(fields) != 6:
            raise ValueError(f"expected a JSON array of 6 fields, got {data[:80]!r}")
        return InflightUpdate(*fields)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"not an in-flight update ({exc}): {data[:80]!r}") from None


def apply_update(load: LoadView, update: InflightUpdate, known: Callable[[str], bool]) -> bool:
    """Apply another replica's update to ``load``; False when it changed nothing (an unknown
    worker, a request already counted or no longer counted)."""
    key = update.key
    if update.kind is InflightKind.ROUTED:
        if not known(update.worker_id) or load.is_in_flight(key):
            return False
        load.on_routed(update.worker_id, key, update.prefill_blocks, update.decode_blocks)
        return True
    if update.kind is InflightKind.PREFILL_DONE:
        return load.on_prefill_done(key)
    return load.on_finished(key)


class PeerLink:
    """This replica's end of the in-flight protocol (see the module docstring)."""

    def __init__(self, nats_url: str, replica_id: str,
                 on_update: Callable[[InflightUpdate], None] | None, *,
                 on_load: Callable[[LoadReport], None] | None = None,
                 backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.replica_id = replica_id
        self._on_update = on_update
        self._on_load = on_load
        self._link = NatsLink(nats_url, f"ferry-router-{replica_id}", self._subscribe, backoff)
        self._queue: deque[bytes] = deque(maxlen=_MAX_QUEUED)
        self._wake = asyncio.Event()
        self._sender: asyncio.Task | None = None
        self.received = 0
        self.sent = 0

    @property
    def link(self) -> NatsLink:
        return self._link

    async def start(self, timeout: float = 0.0) -> bool:
        """Connect in the background; True when subscribed within ``timeout`` seconds."""
        if self._sender is not None:
            raise RuntimeError("PeerLink.start() was already called")
        self._link.start()
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        return await self._link.wait_connected(timeout) is not None

    async def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            client = self._link.client
            if client is not None and self._queue:  # a last chance for what is queued
                await self._send_queued(client)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        await self._link.close()

    def publish(self, kind: InflightKind, request_id: str, worker_id: str = "",
                prefill_blocks: int = 0, decode_blocks: int = 0) -> None:
        """Queue one update of ours; never waits (call it on the link's event loop)."""
        update = InflightUpdate(self.replica_id, kind, request_id, worker_id, prefill_blocks,
                                decode_blocks)
        self._queue.append(encode_update(update))
        self._wake.set()

    # ---------------------------------------------------------------- internals

    async def _subscribe(self, client: NatsClient) -> None:
        if self._on_update is not None:
            await client.subscribe(INFLIGHT_SUBJECT, cb=self._handle)
        if self._on_load is not None:
            await client.subscribe(LOAD_SUBJECTS, cb=self._handle_load)
        await client.flush()

    async def _handle(self, msg: Msg) -> None:
        try:
            update = decode_update(msg.data)
        except ValueError as exc:
            logger.warning("skipping a message on %s: %s", INFLIGHT_SUBJECT, exc)
            return
        if update.replica_id == self.replica_id:
            return
        self.received += 1
        try:
            self._on_update(update)  # type: ignore[misc]
        except Exception:
            logger.exception("applying in-flight update %s failed", update)

    async def _handle_load(self, msg: Msg) -> None:
        try:
            report = decode_load_report(msg.data)
        except ValueError as exc:
            logger.warning("skipping undecodable load report on %s: %s", msg.subject, exc)
            return
        try:
            self._on_load(report)  # type: ignore[misc]
        except Exception:
            logger.exception("on_load failed for worker %s", report.worker_id)

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            client = await self._link.wait_connected(None)
            if client is not None:
                await self._send_queued(client)

    async def _send_queued(self, client: NatsClient) -> None:
        while self._queue:
            data = self._queue[0]
            try:
                await client.publish(INFLIGHT_SUBJECT, data)
            except (nats.errors.Error, OSError) as exc:  # reconnecting: sent once back
                logger.debug("in-flight publish failed (%s); retrying after reconnection", exc)
                self._wake.set()
                await asyncio.sleep(0.05)
                return
            self._queue.popleft()
            self.sent += 1


__all__ = [
    "INFLIGHT_SUBJECT",
    "InflightKind",
    "InflightUpdate",
    "PeerLink",
    "apply_update",
    "decode_update",
    "encode_update",
]
