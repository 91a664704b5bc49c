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
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api

from kvcache.events import KvEventBatch
from kvcache.wire import LoadReport, encode_kv_batch, encode_load_report

logger = logging.getLogger(__name__)

KV_STREAM = "FERRY_KV"
KV_SUBJECT_PREFIX = "ferry.kv."
KV_SUBJECTS = "ferry.kv.>"
LOAD_SUBJECT_PREFIX = "ferry.load."
LOAD_SUBJECTS = "ferry.load.*"
KV_STREAM_MAX_AGE_S = 3600.0
KV_STREAM_MAX_BYTES = 1 << 30
KV_STREAM_DUPLICATE_WINDOW_S = 120.0

_WORKER_ID = re.compile(r"[A-Za-z0-9_-]+")
_WARN_EVERY_S = 60.0


def check_worker_id(worker_id: str) -> str:
    if not isinstance(worker_id, str) or not _WORKER_ID.fullmatch(worker_id):
        raise ValueError(
            f"worker_id {worker_id!r} must be one NATS subject token: letters, digits, '-' and "
            "'_' only (for example 'decode-0')"
        )
    return worker_id


def kv_subject(worker_id: str) -> str:
    return KV_SUBJECT_PREFIX + check_worker_id(worker_id)


def load_subject(worker_id: str) -> str:
    return LOAD_SUBJECT_PREFIX + check_worker_id(worker_id)


async def ensure_kv_stream(nc: NatsClient) -> None:
    """Create stream FERRY_KV unless it exists (idempotent, safe to race)."""
    js = nc.jetstream()
    config = js_api.StreamConfig(
        name=KV_STREAM,
        subjects=[KV_SUBJECTS],
        storage=js_api.StorageType.FILE,
        retention=js_api.RetentionPolicy.LIMITS,
        discard=js_api.DiscardPolicy.OLD,
        max_age=KV_STREAM_MAX_AGE_S,
        max_bytes=KV_STREAM_MAX_BYTES,
        duplicate_window=KV_STREAM_DUPLICATE_WINDOW_S,
        num_replicas=1,
    )
    try:
        await js.add_stream(config)
        return
    except nats.js.errors.BadRequestError:
        pass  # exists with other limits (another Ferry version or an operator's choice)
    info = await js.stream_info(KV_STREAM)
    if KV_SUBJECTS not in (info.config.subjects or []):
        raise RuntimeError(
            f"JetStream stream {KV_STREAM} exists with subjects {info.config.subjects}, not "
            f"{KV_SUBJECTS!r}; delete it (nats stream rm {KV_STREAM}) or use another NATS server"
        )


@dataclass(frozen=True)
class Backoff:
    """Delays between connection attempts: ``initial``, doubling, at most ``maximum`` seconds."""

    initial: float = 0.05
    maximum: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"Backoff needs 0 < initial <= maximum, got initial={self.initial}, "
                f"maximum={self.maximum}"
            )


DEFAULT_BACKOFF = Backoff()


class NatsLink:
    """One NATS connection kept up by a background task.

    Each attempt is a single connection try; on failure the task waits (``Backoff``) and tries
    again. Once connected it runs ``on_connect(client)`` (create streams, subscribe) and then
    waits for the connection to close, after which it starts over. The client does no
    reconnecting of its own, so ``on_connect`` is the one place where state is (re)built.
    """

    def __init__(
        self,
        url: str,
        name: str,
        on_connect: Callable[[NatsClient], Awaitable[None]],
        backoff: Backoff = DEFAULT_BACKOFF,
        connect_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.name = name
        self._on_connect = on_connect
        self.backoff = backoff
        self._connect_timeout = connect_timeout
        self._client: NatsClient | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def client(self) -> NatsClient | None:
        """The connected client, or None while (re)connecting."""
        return self._client if self._connected.is_set() else None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-link")

    async def wait_connected(self, timeout: float | None) -> NatsClient | None:
        """The connected client, waiting up to ``timeout`` seconds (None: no limit)."""
        if not self._connected.is_set():
            if timeout is not None and timeout <= 0:
                return None
            try:
                await asyncio.wait_for(self._connected.wait(), timeout)
            except TimeoutError:
                return None
        return self._client

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            await self._close_quietly(client)

    async def _close_quietly(self, client: NatsClient) -> None:
        if client.is_closed:
            return
        try:
            await client.close()
        except (nats.errors.Error, OSError, TimeoutError) as exc:  # it is going away anyway
            logger.debug("%s: error while closing a NATS connection: %s", self.name, exc)

    async def _connect_once(self) -> tuple[NatsClient, asyncio.Event]:
        """One connection try and ``on_connect``; the event is set when the connection closes."""
        closed = asyncio.Event()
        client_errors: list[Exception] = []

        async def on_closed() -> None:
            closed.set()

        async def on_error(exc: Exception) -> None:
            client_errors.append(exc)
            logger.debug("%s: NATS client error: %s", self.name, exc)

        try:
            client = await nats.connect(
                self.url,
                name=self.name,
                allow_reconnect=False,
                # nats-py tries max_reconnect_attempts + 1 times, here without waiting
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=self._connect_timeout,
                closed_cb=on_closed,
                error_cb=on_error,
            )
        except nats.errors.NoServersError as exc:
            if client_errors:  # say why, e.g. connection refused
                raise ConnectionError(f"{client_errors[-1]}") from exc
            raise
        try:
            await self._on_connect(client)
        except BaseException:
            await self._close_quietly(client)
            raise
        return client, closed

    async def _run(self) -> None:
        delay = self.backoff.initial
        failures, last_warning = 0, float("-inf")
        while not self._closing:
            try:
                client, closed = await self._connect_once()
            except (nats.errors.Error, OSError, TimeoutError, RuntimeError) as exc:
                failures += 1
                now = time.monotonic()
                if now - last_warning >= _WARN_EVERY_S:
                    last_warning = now
                    logger.warning(
                        "%s: NATS at %s not usable (%s: %s); retrying every <= %.1fs "
                        "(%d failed attempts so far)",
                        self.name, self.url, type(exc).__name__, exc, self.backoff.maximum,
                        failures,
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff.maximum)
                continue
            delay, failures, last_warning = self.backoff.initial, 0, float("-inf")
            self._client = client
            self._connected.set()
            logger.info("%s: connected to NATS at %s", self.name, self.url)
            await closed.wait()
            self._connected.clear()
            self._client = None
            if not self._closing:
                logger.warning(
                    "%s: lost the NATS connection to %s; reconnecting", self.name, self.url
                )


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
