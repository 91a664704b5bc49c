"""The worker side of the event plane: KV events and load reports to NATS.

Subjects and stream (the whole protocol; orchestrator/event_subscriber.py is the other side)
--------------------------------------------------------------------------------------------

=============================  ===================================  ===========================
subject                        what the worker publishes            what a router replica does
=============================  ===================================  ===========================
``ferry.kv.<worker_id>``       each ``KvEventBatch`` (bytes of       consumes stream ``FERRY_KV``
                               ``ferry.v1.KvEventBatch``) through    from its first message with
                               JetStream, in ``seq`` order, waiting  an ordered consumer; applies
                               for the store's ack before the next;  batches per worker in seq
                               header ``Nats-Msg-Id`` =              order; on a gap, fetches
                               ``<worker_id>:<instance>:<seq>``      that worker's subject again
                               so a resend after a lost ack is       (``replay``)
                               stored once
``ferry.load.<worker_id>``     ``ferry.v1.LoadReport`` on core       keeps the newest report per
                               NATS (no persistence): a report is    worker (by timestamp)
                               only worth its latest value
``ferry.workers.register``     reserved for ``WorkerRegistration``   (not implemented yet)
=============================  ===================================  ===========================

Stream ``FERRY_KV``: subjects ``ferry.kv.>``, file storage, messages older than
``KV_STREAM_MAX_AGE_S`` (1 h) or beyond ``KV_STREAM_MAX_BYTES`` (oldest first) are dropped, a
2-minute duplicate window for ``Nats-Msg-Id``. Whoever connects first (worker or router)
creates it; creating it again is a no-op, and an existing ``FERRY_KV`` with other limits is
used as it is (its subjects must include ``ferry.kv.>``).

``<worker_id>`` is one subject token: letters, digits, ``-`` and ``_`` (no ``.``, ``*``,
``>`` or spaces). ``<instance>`` is random per :class:`EventPublisher`, so a restarted worker
reusing its id and restarting at seq 0 is not taken for a duplicate.

Failure behaviour (a worker serves requests with or without NATS)
-----------------------------------------------------------------

- ``connect()`` never fails because NATS is down: a background task tries to connect, then
  again after a doubling delay (``Backoff``, bounded), logging a warning the first time and
  once a minute after. When a connection drops, the same loop starts over.
- ``await publish_kv()`` / ``await publish_load()`` return at once and never wait for NATS:
  they encode (a bad value raises ValueError right there, it is the caller's bug) and hand
  the bytes to a sender task. KV batches wait in a bounded queue while NATS is unreachable
  and go out in order once it is back; a batch whose publish fails is sent again. When the
  queue is full the oldest batch is dropped and counted (``stats().dropped_kv``): a router
  sees the gap and cannot replay it from the stream, so it must resynchronise that worker
  another way. Load reports are not queued: the newest one waiting replaces the one before.
- ``close()`` gives the queue ``flush_timeout`` seconds to drain, then disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from kvcache.events import KvEventBatch
from kvcache.wire import LoadReport, encode_kv_batch, encode_load_report
from workers.server.nats_link import (
    DEFAULT_BACKOFF,
    KV_STREAM,
    Backoff,
    NatsLink,
    check_worker_id,
    ensure_kv_stream,
    kv_subject,
    load_subject,
)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PublisherStats:
    connected: bool
    pending_kv: int  # batches waiting to be stored
    published_kv: int  # batches the stream acknowledged
    dropped_kv: int  # batches dropped because the queue was full
    published_load: int


class EventPublisher:
    """Publishes one worker's KV event batches (JetStream) and load reports (core NATS)."""

    def __init__(
        self,
        nats_url: str,
        worker_id: str,
        *,
        max_pending_kv: int = 10_000,
        ack_timeout: float = 2.0,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.worker_id = check_worker_id(worker_id)
        if max_pending_kv < 1:
            raise ValueError(f"max_pending_kv must be >= 1, got {max_pending_kv}")
        if ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be positive seconds, got {ack_timeout}")
        self._kv_subject = kv_subject(worker_id)
        self._load_subject = load_subject(worker_id)
        self._instance = uuid.uuid4().hex[:12]
        self._max_pending_kv = max_pending_kv
        self._ack_timeout = ack_timeout
        self._link = NatsLink(nats_url, f"ferry-worker-{worker_id}", ensure_kv_stream, backoff)
        self._kv: deque[tuple[int, bytes]] = deque()
        self._load: bytes | None = None
        self._published_kv = self._dropped_kv = self._published_load = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, timeout: float = 0.0) -> bool:
        """Start connecting in the background; True when connected within ``timeout`` seconds.

        False is not an error: batches queue up and the link keeps trying.
        """
        if self._loop is not None:
            raise RuntimeError("EventPublisher.connect() was already called")
        self._loop = asyncio.get_running_loop()
        self._link.start()
        self._sender = self._loop.create_task(self._send_loop(), name="ferry-event-sender")
        return await self._link.wait_connected(timeout) is not None

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued batch and report is out; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, flush_timeout: float = 1.0) -> None:
        """Send what is queued (for at most ``flush_timeout`` seconds), then disconnect."""
        if self._closed:
            return
        self._closed = True
        if self._sender is not None and flush_timeout > 0:
            await self.flush(flush_timeout)
        if self._kv:
            logger.warning(
                "worker %s: closing with %d KV batches not stored (seq %d..%d)",
                self.worker_id, len(self._kv), self._kv[0][0], self._kv[-1][0],
            )  # fmt: skip
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        await self._link.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ publishing

    async def publish_kv(self, batch: KvEventBatch) -> None:
        """Queue ``batch`` for the stream and return at once (never waits for NATS)."""
        data = encode_kv_batch(self.worker_id, batch)
        self._in_loop(self._enqueue_kv, batch.seq, data)

    async def publish_load(self, report: LoadReport) -> None:
        """Send ``report`` soon, replacing any report not sent yet; returns at once."""
        if report.worker_id != self.worker_id:
            raise ValueError(
                f"LoadReport.worker_id is {report.worker_id!r} but this publisher is worker "
                f"{self.worker_id!r}"
            )
        self._in_loop(self._set_load, encode_load_report(report))

    def stats(self) -> PublisherStats:
        return PublisherStats(
            connected=self._link.client is not None,
            pending_kv=len(self._kv),
            published_kv=self._published_kv,
            dropped_kv=self._dropped_kv,
            published_load=self._published_load,
        )

    def _in_loop(self, function: Callable[..., None], *args: object) -> None:
        if self._loop is None:
            raise RuntimeError("EventPublisher: call `await connect()` before publishing")
        if self._closed:
            raise RuntimeError("EventPublisher is closed")
        if asyncio.get_running_loop() is self._loop:
            function(*args)
        else:  # awaited on another thread's loop: hand over to ours
            self._loop.call_soon_threadsafe(function, *args)

    def _enqueue_kv(self, seq: int, data: bytes) -> None:
        if len(self._kv) >= self._max_pending_kv:
            dropped_seq, _ = self._kv.popleft()
            self._dropped_kv += 1
            if self._dropped_kv == 1 or self._dropped_kv % 1000 == 0:
                logger.warning(
                    "worker %s: KV event queue full (%d batches, NATS unreachable?); dropped "
                    "batch %d (%d dropped so far): routers will see a gap",
                    self.worker_id, self._max_pending_kv, dropped_seq, self._dropped_kv,
                )  # fmt: skip
        self._kv.append((seq, data))
        self._idle.clear()
        self._wakeup.set()

    def _set_load(self, data: bytes) -> None:
        self._load = data
        self._idle.clear()
        self._wakeup.set()

    async def _send_loop(self) -> None:
        retry_delay = 0.05
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            client = await self._link.wait_connected(None)
            assert client is not None
            try:
                await self._send_pending(client)
            except nats.js.errors.NoStreamResponseError:
                logger.warning(
                    "worker %s: stream %s is gone; creating it", self.worker_id, KV_STREAM
                )
                await self._recreate_stream(client)
                self._wakeup.set()
                continue
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                logger.debug("worker %s: publish failed (%s); will retry", self.worker_id, exc)
                await asyncio.sleep(retry_delay)
                self._wakeup.set()
                continue
            except Exception:
                logger.exception(
                    "worker %s: unexpected publish failure; will retry", self.worker_id
                )
                await asyncio.sleep(retry_delay)
                self._wakeup.set()
                continue
            if not self._kv and self._load is None:
                self._idle.set()

    async def _recreate_stream(self, client: NatsClient) -> None:
        try:
            await ensure_kv_stream(client)
        except (nats.errors.Error, OSError, TimeoutError, RuntimeError) as exc:
            logger.warning("worker %s: could not create %s: %s", self.worker_id, KV_STREAM, exc)
            await asyncio.sleep(self._link.backoff.maximum)

    async def _send_pending(self, client: NatsClient) -> None:
        js = client.jetstream(timeout=self._ack_timeout)
        while self._kv:
            seq, data = self._kv[0]
            msg_id = f"{self.worker_id}:{self._instance}:{seq}"
            await js.publish(self._kv_subject, data, headers={"Nats-Msg-Id": msg_id})
            if self._kv and self._kv[0][0] == seq:  # unless the queue overflowed meanwhile
                self._kv.popleft()
            self._published_kv += 1
        load, self._load = self._load, None
        if load is not None:
            try:
                await client.publish(self._load_subject, load)
            except BaseException:
                if self._load is None:
                    self._load = load
                raise
            self._published_load += 1
