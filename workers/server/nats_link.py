"""NATS plumbing shared by the event plane's two sides: subject names, the ``FERRY_KV``
JetStream stream, and :class:`NatsLink`, a connection that keeps trying.

The subjects and the stream are documented with the protocol in
:mod:`workers.server.event_publisher` (the worker side) and orchestrator/event_subscriber.py
(the router side). ``<worker_id>`` is one subject token: letters, digits, ``-`` and ``_``.

:class:`NatsLink`: ``start()`` never fails because NATS is down: a background task connects,
then tries again after a doubling delay (:class:`Backoff`, bounded), warning the first time and
once a minute after; when a connection drops the same loop starts over and ``on_connect`` runs
again for the new client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api

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


__all__ = ["DEFAULT_BACKOFF", "KV_STREAM", "KV_STREAM_DUPLICATE_WINDOW_S", "KV_STREAM_MAX_AGE_S", "KV_STREAM_MAX_BYTES", "KV_SUBJECTS", "KV_SUBJECT_PREFIX", "LOAD_SUBJECTS", "LOAD_SUBJECT_PREFIX", "Backoff", "NatsLink", "check_worker_id", "ensure_kv_stream", "kv_subject", "load_subject"]
