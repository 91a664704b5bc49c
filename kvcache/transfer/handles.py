"""KV handles on the holder (prefill worker): pinned blocks waiting to be pulled.

Ownership protocol (prefill worker P holds, decode worker D pulls):

1. P's engine finishes a prefill, keeps the request's blocks pinned (its block pool does not
   free or reuse them) and calls :meth:`HandleRegistry.create`. From then on the *registry*
   owns the pin: the engine never writes those blocks, and unpins them only when the registry
   calls ``on_release(info)``.
2. D pulls the blocks (any transport). A gRPC pull takes a *lease* on the handle
   (:meth:`HandleRegistry.lease`) for the whole stream, so neither a release nor the TTL can
   unpin the blocks while their bytes are being read. Shared-memory and CUDA-IPC pulls read
   P's memory without P knowing; they are validated afterwards instead: D releases the handle
   when its copy is complete and keeps the copy only if that release succeeded (the handle
   was still pinned, so nothing overwrote the blocks during the copy).
3. The handle ends exactly once, by whichever comes first:
   - ``release(handle_id)``: D's ``KvTransfer.ReleaseHandle`` (copy complete or failed), or
     P itself cancelling the request (the frontend aborted it);
   - the TTL: ``expire()`` (call it periodically) ends handles older than ``ttl_s`` that no
     lease holds; a handle past its TTL is also ended by the first ``get``/``lease`` that
     sees it (so a late pull fails cleanly, deterministically);
   - ``release_all()`` at shutdown.
   Ending marks the handle gone at once (every later ``get``/``lease`` raises
   :class:`~kvcache.transfer.errors.HandleNotFound` naming why), and calls
   ``on_release(info)`` once no lease holds it: immediately, or when the last lease closes
   (a stream being served stops at its next chunk with an error and closes its lease).
4. ``on_release`` runs on the thread that ended the handle (or closed the last lease), never
   under the registry's lock, exactly once per handle. The worker hands it to its engine
   thread (a queue) to unpin the blocks. An exception from it is logged, not raised.

Timeout and cancel, seen from here: a puller that gives up (its deadline, or its request
cancelled) just stops reading; its stream's lease closes and the handle stays pinned until the
puller's ReleaseHandle or the TTL. The registry is thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

from kvcache.transfer.errors import HandleNotFound

log = logging.getLogger(__name__)

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_ENDED_MEMORY = 4096  # ended handle ids remembered, for "released" / "expired" messages


@dataclass(frozen=True)
class KvHandleInfo:
    """A handle as it travels (``ferry.v1.KvHandle``): which blocks, on which worker, how to
    pull them. ``len(block_ids) == ceil(num_tokens / block_size)`` and
    ``len(block_hashes) == num_tokens // block_size`` (a partial last block has no hash)."""

    handle_id: str
    worker_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]
    num_tokens: int
    block_size: int
    transport_address: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_ids", tuple(self.block_ids))
        object.__setattr__(self, "block_hashes", tuple(self.block_hashes))
        for name in ("handle_id", "worker_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"KvHandle.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.transport_address, str):
            raise TypeError(
                f"KvHandle.transport_address must be a string, got {self.transport_address!r}"
            )
        for name, upper in (("block_size", _U32_MAX), ("num_tokens", _U32_MAX)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
                raise ValueError(f"KvHandle.{name} must be a positive integer, got {value!r}")
        for b in self.block_ids:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= _U32_MAX:
                raise ValueError(f"KvHandle.block_ids holds {b!r}, not a uint32 block id")
        if len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError(f"KvHandle.block_ids must be distinct, got {list(self.block_ids)}")
        for h in self.block_hashes:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= _U64_MAX:
                raise ValueError(f"KvHandle.block_hashes holds {h!r}, not a uint64 hash")
        need_ids = -(-self.num_tokens // self.block_size)
        if len(self.block_ids) != need_ids:
            raise ValueError(
                f"KvHandle of {self.num_tokens} tokens at block_size {self.block_size} needs "
                f"{need_ids} block ids, got {len(self.block_ids)}"
            )
        need_hashes = self.num_tokens // self.block_size
        if len(self.block_hashes) != need_hashes:
            raise ValueError(
                f"KvHandle of {self.num_tokens} tokens at block_size {self.block_size} needs "
                f"{need_hashes} block hashes (full blocks only), got {len(self.block_hashes)}"
            )


class _Entry:
    __slots__ = ("ended", "expires_at", "info", "leases")

    def __init__(self, info: KvHandleInfo, expires_at: float) -> None:
        self.info = info
        self.expires_at = expires_at
        self.leases = 0
        self.ended: str | None = None  # why, once ended while a lease still held it


class HandleLease:
    """A pull in progress on one handle (from :meth:`HandleRegistry.lease`). While it is open
    the handle's blocks stay pinned; :attr:`alive` turns False once the handle has been ended
    (released, cancelled), and the reader must then stop. Close it exactly once (or use it as
    a context manager)."""

    def __init__(self, registry: HandleRegistry, entry: _Entry) -> None:
        self._registry = registry
        self._entry = entry
        self._closed = False
        self.info = entry.info

    @property
    def alive(self) -> bool:
        return self._entry.ended is None

    @property
    def ended_reason(self) -> str | None:
        return self._entry.ended

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._registry._close_lease(self._entry)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HandleRegistry:
    """The holder's live handles (see the module docstring for the protocol)."""

    def __init__(
        self,
        ttl_s: float,
        on_release: Callable[[KvHandleInfo], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not ttl_s > 0:
            raise ValueError(f"handle ttl_s must be a positive number of seconds, got {ttl_s!r}")
        self.ttl_s = float(ttl_s)
        self._on_release = on_release
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._prefix = f"kvh-{secrets.token_hex(4)}-"
        self._counter = itertools.count(1)

    # -- create and look up ---------------------------------------------------------------------

    def create(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        num_tokens: int,
        block_size: int,
        worker_id: str,
        transport_address: str,
    ) -> KvHandleInfo:
        """Register pinned blocks under a new, unique handle id and start its TTL."""
        with self._lock:
            handle_id = f"{self._prefix}{next(self._counter)}"
        info = KvHandleInfo(handle_id, worker_id, tuple(block_ids), tuple(block_hashes),
                            num_tokens, block_size, transport_address)
        with self._lock:
            self._entries[handle_id] = _Entry(info, self._clock() + self.ttl_s)
        return info

    def get(self, handle_id: str) -> KvHandleInfo:
        """The live handle; HandleNotFound (saying unknown, released or expired) otherwise."""
        return self._live_entry(handle_id, take_lease=False).info

    def lease(self, handle_id: str) -> HandleLease:
        """Hold the handle's blocks pinned for a pull (see :class:`HandleLease`)."""
        return HandleLease(self, self._live_entry(handle_id, take_lease=True))

    def expires_at(self, handle_id: str) -> float:
        """When the handle's TTL ends, on the registry's clock."""
        return self._live_entry(handle_id, take_lease=False).expires_at

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def handle_ids(self) -> list[str]:
        """Ids of handles not yet released to ``on_release`` (leased ones included)."""
        with self._lock:
            return list(self._entries)

    # -- end ----------------------------------------------------------------------------------

    def release(self, handle_id: str, *, reason: str = "released") -> bool:
        """End a handle (a puller's ReleaseHandle, or a cancel). False when it was unknown or
        already ended: a release racing the TTL or another release is not an error."""
        with self._lock:
            entry = self._entries.get(handle_id)
            if entry is None or entry.ended is not None:
                return False
            done = self._end_locked(entry, reason)
        self._notify(done)
        return True

    def expire(self) -> list[KvHandleInfo]:
        """End every handle past its TTL that no lease holds; returns them (on_release has been
        called for each). A leased handle past its TTL ends at the first call after its lease."""
        now = self._clock()
        with self._lock:
            due = [e for e in self._entries.values()
                   if e.ended is None and e.leases == 0 and now >= e.expires_at]
            done = [info for e in due for info in self._end_locked(e, self._expired_reason())]
        self._notify(done)
        return done

    def release_all(self, *, reason: str = "released at worker shutdown") -> list[KvHandleInfo]:
        """End every live handle (worker shutdown). Returns those released now; leased ones are
        released when their lease closes."""
        with self._lock:
            live = [e for e in self._entries.values() if e.ended is None]
            done = [info for e in live for info in self._end_locked(e, reason)]
        self._notify(done)
        return done

    # -- internals ------------------------------------------------------------------------------

    def _expired_reason(self) -> str:
        return f"expired (not released within its TTL of {self.ttl_s:g} s)"

    def _live_entry(self, handle_id: str, *, take_lease: bool) -> _Entry:
        done: list[KvHandleInfo] = []
        with self._lock:
            entry = self._entries.get(handle_id)
            if entry is not None and entry.ended is None and entry.leases == 0 \
                    and self._clock() >= entry.expires_at:
                done = self._end_locked(entry, self._expired_reason())
            if entry is not None and entry.ended is None:
                if take_lease:
                    entry.leases += 1
                return entry
            why = entry.ended if entry is not None else self._ended.get(handle_id)
        self._notify(done)
        if why is None:
            raise HandleNotFound(f"KV handle {handle_id!r} is unknown on this worker")
        raise HandleNotFound(f"KV handle {handle_id!r} was {why}; its blocks are no longer pinned")

    def _end_locked(self, entry: _Entry, reason: str) -> list[KvHandleInfo]:
        """Mark ended; pop it and return its info for on_release when no lease holds it."""
        entry.ended = reason
        self._ended[entry.info.handle_id] = reason
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)
        if entry.leases:
            return []
        del self._entries[entry.info.handle_id]
        return [entry.info]

    def _close_lease(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            done: list[KvHandleInfo] = []
            if entry.leases == 0 and entry.ended is not None \
                    and self._entries.get(entry.info.handle_id) is entry:
                del self._entries[entry.info.handle_id]
                done = [entry.info]
        self._notify(done)

    def _notify(self, infos: list[KvHandleInfo]) -> None:
        for info in infos:
            try:
                self._on_release(info)
            except Exception:
                log.exception("on_release failed for KV handle %s", info.handle_id)
