"""One call for the decode worker: pull a handle's KV by whatever transport it names, release it.

:func:`pull` is what the decode worker calls between allocating destination blocks and
committing them to its prefix cache:

1. It parses ``handle.transport_address`` (:mod:`kvcache.transfer.address`) and copies
   the blocks with that transport: gRPC stream (:mod:`~kvcache.transfer.grpc_transport`),
   shared memory (:mod:`~kvcache.transfer.shm`) or CUDA IPC
   (:mod:`~kvcache.transfer.cuda_ipc`). When a shared-memory segment or CUDA-IPC export is not
   reachable from here (the holder is on another host or node), it falls back to a gRPC pull
   from the same holder (``fallback_to_grpc``); :attr:`PullResult.transport` says which ran.
2. Whatever happened, it then releases the handle on the holder (``KvTransfer.ReleaseHandle``),
   unless ``release=False``: after a success, after a failure, and (in the background) after
   the pull was cancelled. The holder unpins the blocks.
3. A shared-memory or CUDA-IPC copy read the holder's memory without the holder's knowledge;
   it counts only if the release answered ``released = true`` (the handle was still pinned,
   so no block was reused during the copy). Otherwise the pull fails with HandleNotFound.

Ownership on the puller: the destination blocks are the caller's (allocated for this request)
before, during and after the pull. On success they hold the handle's KV, bit for bit; on any
:class:`~kvcache.transfer.errors.KvTransferError` (holder gone, handle released or expired,
corrupt chunk, layout mismatch, ``timeout_s`` passed) or cancellation they hold garbage: free
them without caching and prefill locally. Nothing writes into them once :func:`pull` has
returned, raised or been cancelled. A caller's bug (wrong number of destination blocks, ids out
of range) raises ValueError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence

from kvcache.transfer.address import CUDA_IPC, SHM, parse_transport_address
from kvcache.transfer.errors import (
    HandleNotFound,
    KvTransferError,
    TransferTimeout,
    TransportUnavailable,
)
from kvcache.transfer.grpc_transport import pull_grpc, release_remote
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvCacheView
from kvcache.transfer.result import PullResult, check_pull_args

log = logging.getLogger(__name__)

_copy_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-copy")
_background: set[asyncio.Task] = set()


async def pull(
    handle: KvHandleInfo,
    dest_view: KvCacheView,
    dest_block_ids: Sequence[int],
    *,
    timeout_s: float,
    src_block_ids: Sequence[int] | None = None,
    release: bool = True,
    fallback_to_grpc: bool = True,
    release_timeout_s: float = 5.0,
) -> PullResult:
    """Pull ``src_block_ids`` (default: all) of ``handle`` into ``dest_block_ids`` of
    ``dest_view``, then release the handle (see the module docstring). ``timeout_s`` bounds
    the copy (TransferTimeout past it, fallback included); the release after it has its own
    ``release_timeout_s``."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    try:
        address = parse_transport_address(handle.transport_address)
    except ValueError as exc:
        raise KvTransferError(f"KV handle {handle.handle_id!r}: {exc}",
                              code="INVALID_ARGUMENT") from exc
    check_pull_args(handle, dest_view, dest_block_ids, src_block_ids)
    grpc_address = address.grpc_address
    try:
        result = await _transfer(address.scheme, grpc_address, handle, dest_view,
                                 dest_block_ids, timeout_s, src_block_ids, fallback_to_grpc)
    except asyncio.CancelledError:
        if release:
            _release_in_background(grpc_address, handle.handle_id, release_timeout_s)
        raise
    except BaseException:
        if release:
            try:
                await release_remote(grpc_address, handle.handle_id, timeout_s=release_timeout_s)
            except KvTransferError as exc:
                log.warning("could not release KV handle %s after a failed pull: %s",
                            handle.handle_id, exc)
        raise
    if not release:
        return result
    direct = result.transport in (SHM, CUDA_IPC)
    try:
        released = await release_remote(grpc_address, handle.handle_id,
                                         timeout_s=release_timeout_s)
    except KvTransferError as exc:
        if direct:
            raise TransportUnavailable(
                f"copied KV handle {handle.handle_id!r} over {result.transport} but could not "
                f"confirm it with the holder at {grpc_address}: {exc}; the copy is discarded"
            ) from exc
        log.warning("pulled KV handle %s but could not release it: %s", handle.handle_id, exc)
        released = False
    if direct and not released:
        raise HandleNotFound(
            f"KV handle {handle.handle_id!r} ended on the holder (released, cancelled or past "
            f"its TTL) before the {result.transport} copy was confirmed; the copy is discarded"
        )
    return PullResult(result.nbytes, result.blocks, result.seconds, result.transport, released)


async def _transfer(scheme, grpc_address, handle, dest_view, dest_block_ids, timeout_s,
                    src_block_ids, fallback_to_grpc) -> PullResult:
    if scheme in (SHM, CUDA_IPC):
        if scheme == SHM:
            from kvcache.transfer.shm import pull_shm as direct
        else:
            from kvcache.transfer.cuda_ipc import pull_cuda_ipc as direct
        started = time.monotonic()
        try:
            return await _in_thread(direct, handle, dest_view, dest_block_ids, timeout_s,
                                    src_block_ids)
        except TransportUnavailable as exc:
            if not fallback_to_grpc:
                raise
            log.info("KV handle %s: %s; pulling over gRPC from %s instead", handle.handle_id,
                     exc, grpc_address)
            timeout_s = max(timeout_s - (time.monotonic() - started), 0.001)
    return await pull_grpc(grpc_address, handle, dest_view, dest_block_ids,
                           timeout_s=timeout_s, src_block_ids=src_block_ids)


async def _in_thread(copy: Callable[..., PullResult], handle, dest_view, dest_block_ids,
                     timeout_s, src_block_ids) -> PullResult:
    """Run a blocking copy on a thread; stop it at the deadline or on cancel, and return only
    once it no longer touches the destination."""
    stop = threading.Event()
    deadline = time.monotonic() + timeout_s

    def should_stop() -> bool:
        return stop.is_set() or time.monotonic() > deadline

    future = _copy_pool.submit(copy, handle, dest_view, dest_block_ids,
                               src_block_ids=src_block_ids, should_stop=should_stop)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        stop.set()
        concurrent.futures.wait([future])  # at most one block run still copying
        raise
    except KvTransferError as exc:
        if exc.code == "CANCELLED" and not stop.is_set():
            raise TransferTimeout(
                f"pulling KV handle {handle.handle_id!r} took longer than {timeout_s:g} s"
            ) from exc
        raise


def _release_in_background(address: str, handle_id: str, timeout_s: float) -> None:
    async def release() -> None:
        try:
            await release_remote(address, handle_id, timeout_s=timeout_s)
        except KvTransferError as exc:
            log.warning("could not release KV handle %s after a cancelled pull: %s",
                        handle_id, exc)

    task = asyncio.get_running_loop().create_task(release())
    _background.add(task)
    task.add_done_callback(_background.discard)
