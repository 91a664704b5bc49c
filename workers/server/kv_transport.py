"""Which transport moves a worker's KV blocks to a decode worker (``WorkerConfig.kv_transport``).

Settings (``ferry serve --kv-transport``; the default is ``auto``):

| setting | holder (hands out KV handles) advertises | puller (imports handles) |
|---|---|---|
| ``auto`` | ``shm://NAME@host:port`` when its caches live in a shared-memory arena; ``cuda-ipc://NAME@host:port`` when they live on a GPU; ``host:port`` (gRPC) otherwise | what the handle's address names |
| ``grpc`` | ``host:port`` | always the gRPC stream, whatever the address |
| ``shm`` | ``shm://NAME@host:port``; a prefill worker refuses to start unless its caches are in an arena (other roles hand out no handles in a deployment: gRPC) | what the handle's address names |
| ``cuda-ipc`` | ``cuda-ipc://NAME@host:port``; refuses to start unless its caches are on a GPU | what the handle's address names |

A puller given an ``shm://`` or ``cuda-ipc://`` address it cannot open (the holder is on
another host, or in another container without a shared /dev/shm) pulls over gRPC from the
same holder instead (:func:`kvcache.transfer.puller.pull`); the worker's stats count each
import under the transport that actually moved it. The release always goes through gRPC.

Arena (holder side): the KV caches must be *allocated* in shared memory, so the engine is
built with them there (:func:`arena_name`, ``build_torch_engine(kv_arena_name=...)``, or
:func:`mocker_arena` for a mocker, which has no KV bytes: its arena is only the 4 KiB header,
and its shm pulls move zero bytes). :func:`wants_arena` says when a worker process makes one:
a prefill worker (the only role that hands out handles in a Ferry deployment) whose setting is
``auto`` or ``shm`` and whose caches are in host memory (a /dev/shm without room for them
means private caches and gRPC under ``auto``, a worker that refuses to start under ``shm``;
its pages are reserved when it is made). The worker server owns the arena
once given it and unlinks ``/dev/shm/NAME`` when it stops; a worker killed before that leaves
the file behind, and the next worker started on the host deletes it
(:func:`remove_stale_arenas`: segments whose creator process is gone).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kvcache.transfer imports torch and grpc: only where a worker runs
    from kvcache.transfer.layout import KvCacheView
    from kvcache.transfer.shm import SharedKvArena

log = logging.getLogger(__name__)

AUTO = "auto"
# The transports' names are kvcache.transfer.address.SCHEMES (not imported here, so that the
# command line can offer the choices without importing torch).
GRPC, SHM, CUDA_IPC = "grpc", "shm", "cuda-ipc"
KV_TRANSPORTS = (AUTO, GRPC, SHM, CUDA_IPC)
ARENA_PREFIX = "ferry-kv-"


def check_kv_transport(value: object) -> str:
    """``value`` when it is a known setting; ValueError naming the choices otherwise."""
    if value not in KV_TRANSPORTS:
        raise ValueError(f"kv_transport must be one of {list(KV_TRANSPORTS)} (auto: shared "
                         f"memory on one host, gRPC between hosts), got {value!r}")
    return value  # type: ignore[return-value]


def wants_arena(kv_transport: str, role: str, device: str = "cpu") -> bool:
    """Whether a worker of ``role`` builds its KV caches in a shared-memory arena."""
    check_kv_transport(kv_transport)
    return role == "prefill" and kv_transport in (AUTO, SHM) and device == "cpu"


def arena_name(worker_id: str) -> str:
    """A fresh /dev/shm name for a worker's arena: prefix, worker id, pid, random suffix."""
    return f"{ARENA_PREFIX}{worker_id}-{os.getpid()}-{secrets.token_hex(4)}"


def mocker_arena(name: str, block_size: int, num_blocks: int) -> SharedKvArena:
    """A mocker engine's arena: a layout without layers (no KV bytes), only the header."""
    from kvcache.transfer.layout import KvLayout
    from kvcache.transfer.shm import SharedKvArena

    return SharedKvArena.create(name, KvLayout.of([], block_size, num_blocks=num_blocks))


def remove_stale_arenas() -> list[str]:
    """Delete Ferry worker arenas whose creator is gone (a worker killed before its stop)."""
    from kvcache.transfer.shm import remove_stale_segments

    removed = remove_stale_segments(ARENA_PREFIX)
    if removed:
        log.info("removed %d stale KV arena(s) from /dev/shm: %s", len(removed), removed)
    return removed


@dataclass
class HolderTransport:
    """What a holder advertises in its handles, and what it must close at shutdown."""

    scheme: str  # "grpc", "shm" or "cuda-ipc"
    name: str | None = None  # the /dev/shm name of the arena or CUDA-IPC export
    _close: Callable[[], None] = field(default=lambda: None, repr=False)

    def address(self, grpc_address: str) -> str:
        """The ``transport_address`` of this worker's handles."""
        from kvcache.transfer.address import TransportAddress

        return str(TransportAddress(self.scheme, grpc_address, self.name))

    def close(self) -> None:
        """Unlink the arena / export (idempotent)."""
        self._close()


def holder_transport(setting: str, view: KvCacheView, arena: SharedKvArena | None,
                     worker_id: str, role: str) -> HolderTransport:
    """Decide what the holder advertises (see the module docstring). ``view`` is the engine's
    cache; ``arena``, when given, must hold exactly those caches (ValueError otherwise) and is
    closed by the returned object. A setting the caches cannot serve raises ValueError."""
    check_kv_transport(setting)
    if arena is not None:
        _check_arena(arena, view)
    close_arena = arena.close if arena is not None else (lambda: None)
    if setting == GRPC:
        return HolderTransport(GRPC, None, close_arena)
    if arena is not None and setting in (AUTO, SHM):
        return HolderTransport(SHM, arena.name, close_arena)
    if setting == SHM and role == "prefill":
        raise ValueError(
            "kv_transport='shm' needs a prefill worker's KV caches in a shared-memory arena: "
            "build the engine with build_torch_engine(kv_arena_name=...) and pass kv_arena= to "
            "the WorkerServer, or use kv_transport='grpc' or 'auto'")
    on_gpu = view.device.type == "cuda"
    if setting == CUDA_IPC or (setting == AUTO and on_gpu):
        from kvcache.transfer.errors import TransportUnavailable

        try:
            from kvcache.transfer.cuda_ipc import CudaIpcExport

            export = CudaIpcExport.create(arena_name(worker_id), view.caches,
                                          view.layout.block_size,
                                          num_blocks=view.layout.num_blocks)
        except TransportUnavailable as exc:
            if setting == CUDA_IPC:
                raise ValueError(f"kv_transport='cuda-ipc' cannot be used: {exc}") from exc
            log.warning("CUDA IPC export failed (%s); KV handles are pulled over gRPC", exc)
            return HolderTransport(GRPC, None, close_arena)

        def close() -> None:
            export.close()
            close_arena()

        return HolderTransport(CUDA_IPC, export.name, close)
    return HolderTransport(GRPC, None, close_arena)


def _check_arena(arena: SharedKvArena, view: KvCacheView) -> None:
    ours, theirs = arena.view.layout, view.layout
    same = ours == theirs and all(
        a.data_ptr() == b.data_ptr() for a, b in zip(arena.caches, view.caches, strict=True))
    if not same:
        raise ValueError(
            f"kv_arena {arena.name!r} ({ours}) does not hold this engine's KV caches "
            f"({theirs}): build the engine with its caches in that arena")


__all__ = ["ARENA_PREFIX", "AUTO", "KV_TRANSPORTS", "HolderTransport", "arena_name",
           "check_kv_transport", "holder_transport", "mocker_arena", "remove_stale_arenas",
           "wants_arena"]
