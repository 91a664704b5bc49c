"""KV transfer between workers (disaggregated prefill and decode).

- :mod:`~kvcache.transfer.layout`: the paged KV cache's layout and block-level access.
- :mod:`~kvcache.transfer.handles`: the holder's handle registry: who owns a pinned block when,
  TTL, leases, exactly-once release.
- :mod:`~kvcache.transfer.address`: the ``transport_address`` formats.
- :mod:`~kvcache.transfer.grpc_transport`: the KvTransfer gRPC service and its puller.
- :mod:`~kvcache.transfer.shm`: KV caches in shared memory, pulled with one copy on one host.
- :mod:`~kvcache.transfer.cuda_ipc`: GPU caches pulled device to device on one node.
- :mod:`~kvcache.transfer.puller`: :func:`pull`, choosing the transport and releasing.
- :mod:`~kvcache.transfer.wire`: conversions to and from ``ferry.v1`` messages.
- :mod:`~kvcache.transfer.tuning`: :func:`tune_malloc`, which a worker calls once at start-up.

A worker wires it up as follows. Holder (prefill): caches from ``SharedKvArena.create`` (shm
on) or ``make_kv_caches``; ``HandleRegistry(ttl_s, on_release)`` (``on_release`` queues an
unpin to the engine thread; call ``registry.expire()`` periodically); a ``grpc.aio`` server
built with ``options=SERVER_OPTIONS`` and ``KvTransferServicer(registry, view).add_to_server``;
``registry.create(...)`` after prefill, ``handle_to_proto`` on the last chunk, and
``registry.release(handle_id)`` when the request is cancelled. Puller (decode):
``handle_from_proto``, allocate destination blocks, ``await pull(handle, view, dest_ids,
timeout_s=...)``, then commit the blocks, or free them and prefill locally on
``KvTransferError``.

Ferry's workers do all of this in ``workers/server`` (``disagg.py``, ``worker.py``), choosing
the transport their handles name with ``WorkerConfig.kv_transport`` (``kv_transport.py``).

Imports ``proto`` and third-party libraries only.
"""

from kvcache.transfer.address import TransportAddress, parse_transport_address
from kvcache.transfer.errors import (
    HandleNotFound,
    KvLayoutMismatch,
    KvTransferError,
    TransferIntegrityError,
    TransferTimeout,
    TransportUnavailable,
)
from kvcache.transfer.grpc_transport import (
    SERVER_OPTIONS,
    KvTransferServicer,
    pull_grpc,
    release_remote,
)
from kvcache.transfer.handles import HandleLease, HandleRegistry, KvHandleInfo
from kvcache.transfer.layout import KvCacheView, KvLayout
from kvcache.transfer.puller import pull
from kvcache.transfer.result import PullResult
from kvcache.transfer.shm import SharedKvArena, pull_shm
from kvcache.transfer.tuning import tune_malloc
from kvcache.transfer.wire import handle_from_proto, handle_to_proto

__all__ = [
    "SERVER_OPTIONS",
    "HandleLease",
    "HandleNotFound",
    "HandleRegistry",
    "KvCacheView",
    "KvHandleInfo",
    "KvLayout",
    "KvLayoutMismatch",
    "KvTransferError",
    "KvTransferServicer",
    "PullResult",
    "SharedKvArena",
    "TransferIntegrityError",
    "TransferTimeout",
    "TransportAddress",
    "TransportUnavailable",
    "handle_from_proto",
    "handle_to_proto",
    "parse_transport_address",
    "pull",
    "pull_grpc",
    "pull_shm",
    "release_remote",
    "tune_malloc",
]
