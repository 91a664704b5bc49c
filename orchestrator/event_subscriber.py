"""The router side of the event plane: every worker's KV events and load reports from NATS.

The subjects, the stream and what the workers do are documented side by side in
workers/server/event_publisher.py. What this side does:

- KV events: an ordered push consumer on stream ``FERRY_KV`` (subjects ``ferry.kv.>``),
  ephemeral, delivering from the stream's first message. A subscriber that starts late
  therefore replays every batch still in the stream (the last hour), per worker in the order
  published. Each batch goes to ``on_kv(worker_id, batch)``. After a lost connection the
  consumer is made again from the stream sequence after the last one delivered, so nothing is
  delivered twice and nothing is skipped; when the stream itself was recreated meanwhile (its
  creation time changed, e.g. a restarted NATS server with a new store), it is read from its
  beginning again.
- Load reports: a core subscription on ``ferry.load.*``; each report goes to ``on_load``.
- ``replay(worker_id, from_seq)``: for gap repair. A short-lived pull consumer filtered on
  ``ferry.kv.<worker_id>`` reads that worker's stored batches and returns those with
  ``seq >= from_seq``, in stream order. Batches older than the stream's limits are gone: the
  result then starts above ``from_seq`` and the caller must resynchronise another way.

Callbacks run on the event loop that called ``start()``; they must not block. A callback that
raises is logged and the message is skipped; so is a message that does not decode, and a KV
batch whose ``worker_id`` is not the one its subject names.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Self

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.client import JetStreamContext

from kvcache.events import KvEventBatch
from kvcache.wire import LoadReport, decode_kv_batch, decode_load_report
from workers.server.nats_link import (
    DEFAULT_BACKOFF,
    KV_STREAM,
    KV_SUBJECT_PREFIX,
    KV_SUBJECTS,
    LOAD_SUBJECTS,
    Backoff,
    NatsLink,
    ensure_kv_stream,
    kv_subject,
)

logger = logging.getLogger(__name__)

_REPLAY_FETCH = 256


class EventSubscriber:
    """Feeds a router: ``on_kv(worker_id, batch)`` for each KV batch, ``on_load(report)``."""

    def __init__(
        self,
        nats_url: str,
        on_kv: Callable[[str, KvEventBatch], None],
        on_load: Callable[[LoadReport], None],
        *,
        name: str = "ferry-router",
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._on_kv = on_kv
        self._on_load = on_load
        self._link = NatsLink(nats_url, name, self._subscribe, backoff)
        self._last_stream_seq = 0  # stream sequence of the last KV message handled
        self._stream_created: datetime | None = None  # tells a recreated stream apart
        self._kv_received = 0
        self._load_received = 0
        self._started = False

    @property
    def kv_received(self) -> int:
        """KV batches handed to ``on_kv`` so far."""
        return self._kv_received

    @property
    def load_received(self) -> int:
        return self._load_received

    async def start(self, timeout: float = 0.0) -> bool:
        """Start consuming in the background; True when subscribed within ``timeout`` seconds.

        False is not an error: the link keeps trying (see NatsLink) and subscribes once NATS
        is reachable.
        """
        if self._started:
            raise RuntimeError("EventSubscriber.start() was already called")
        self._started = True
        self._link.start()
        return await self._link.wait_connected(timeout) is not None

    async def close(self) -> None:
        await self._link.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ live consumption

    async def _subscribe(self, client: NatsClient) -> None:
        """Run by the link on every (re)connection: stream, KV consumer, load subscription."""
        await ensure_kv_stream(client)
        js = client.jetstream()
        info = await js.stream_info(KV_STREAM)
        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
        if self._last_stream_seq:
            if (
                info.created == self._stream_created
                and info.state.last_seq >= self._last_stream_seq
            ):
                config = js_api.ConsumerConfig(
                    deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self._last_stream_seq + 1,
                )
            else:
                logger.warning(
                    "stream %s was recreated since it was last read; consuming it from the start",
                    KV_STREAM,
                )
                self._last_stream_seq = 0
        self._stream_created = info.created
        await js.subscribe(
            KV_SUBJECTS,
            stream=KV_STREAM,
            cb=self._handle_kv,
            ordered_consumer=True,
            config=config,
        )
        await client.subscribe(LOAD_SUBJECTS, cb=self._handle_load)
        await client.flush()

    async def _handle_kv(self, msg: Msg) -> None:
        stream_seq = msg.metadata.sequence.stream
        if stream_seq <= self._last_stream_seq:
            return  # already handled before a reconnection
        self._last_stream_seq = stream_seq
        try:
            worker_id, batch = decode_kv_batch(msg.data)
        except ValueError as exc:
            logger.warning(
                "skipping undecodable KV message %d on %s: %s", stream_seq, msg.subject, exc
            )
            return
        if msg.subject != KV_SUBJECT_PREFIX + worker_id:
            logger.warning(
                "skipping KV batch of worker %r published on %s (a worker publishes on %s<id>)",
                worker_id, msg.subject, KV_SUBJECT_PREFIX,
            )  # fmt: skip
            return
        try:
            self._on_kv(worker_id, batch)
        except Exception:
            logger.exception("on_kv failed for worker %s batch %d", worker_id, batch.seq)
        self._kv_received += 1

    async def _handle_load(self, msg: Msg) -> None:
        try:
            report = decode_load_report(msg.data)
        except ValueError as exc:
            logger.warning("skipping undecodable load report on %s: %s", msg.subject, exc)
            return
        try:
            self._on_load(report)
        except Exception:
            logger.exception("on_load failed for worker %s", report.worker_id)
        self._load_received += 1

    # ------------------------------------------------------------------ gap repair

    async def replay(
        self, worker_id: str, from_seq: int, timeout: float = 5.0
    ) -> list[KvEventBatch]:
        """That worker's stored batches with ``seq >= from_seq``, in the order published.

        Raises ConnectionError when NATS is not reachable within ``timeout`` seconds.
        """
        if from_seq < 0:
            raise ValueError(f"from_seq must be >= 0, got {from_seq}")
        subject = kv_subject(worker_id)
        client = await self._link.wait_connected(timeout)
        if client is None:
            raise ConnectionError(f"replay of {worker_id}: NATS at {self._link.url} unreachable")
        js = client.jetstream(timeout=timeout)
        consumer = f"ferry-replay-{uuid.uuid4().hex}"
        await js.add_consumer(
            KV_STREAM,
            js_api.ConsumerConfig(
                name=consumer,
                filter_subject=subject,
                deliver_policy=js_api.DeliverPolicy.ALL,
                ack_policy=js_api.AckPolicy.NONE,
                inactive_threshold=max(timeout, 5.0),  # the server drops it if we vanish
                mem_storage=True,
                num_replicas=1,
            ),
        )
        try:
            return await self._read_consumer(js, consumer, worker_id, from_seq, timeout)
        finally:
            try:
                await js.delete_consumer(KV_STREAM, consumer)
            except (nats.errors.Error, TimeoutError) as exc:
                logger.debug(
                    "replay consumer %s not deleted (%s); it expires itself", consumer, exc
                )

    async def _read_consumer(
        self,
        js: JetStreamContext,
        consumer: str,
        worker_id: str,
        from_seq: int,
        timeout: float,
    ) -> list[KvEventBatch]:
        subscription = await js.pull_subscribe_bind(consumer=consumer, stream=KV_STREAM)
        try:
            pending = (await subscription.consumer_info()).num_pending
            batches: list[KvEventBatch] = []
            while pending > 0:
                messages = await subscription.fetch(min(pending, _REPLAY_FETCH), timeout=timeout)
                for message in messages:
                    try:
                        sender, batch = decode_kv_batch(message.data)
                    except ValueError as exc:
                        logger.warning(
                            "replay of %s: skipping undecodable message: %s", worker_id, exc
                        )
                        continue
                    if sender == worker_id and batch.seq >= from_seq:
                        batches.append(batch)
                pending = messages[-1].metadata.num_pending
            return batches
        finally:
            await subscription.unsubscribe()
