"""gRPC KV transport: the holder streams a handle's blocks, the puller writes them into its cache.

Protocol of ``KvTransfer.PullBlocks`` (holder = servicer here, puller = :func:`pull_grpc`):

- The puller sends the handle id, optionally the subset of the handle's block ids it wants
  (default all, in handle order) and its own cache layout.
- The holder takes a lease on the handle (see :mod:`kvcache.transfer.handles`), checks the
  subset and the layout, and streams, for each requested block in request order, chunks
  covering layers ``[0, num_layers)`` in order, each ``[layer_start, layer_end)`` of at most
  ``max_chunk_bytes`` of data (default 4 MiB), with ``crc32 = zlib.crc32(data)``. A zero-layer
  (mocker) cache sends no chunks: an empty stream is a complete, valid transfer.
- Memory is bounded on both sides: the holder reads a chunk from its cache only when its
  server has taken the previous one (an async generator, paced by HTTP/2 flow control and by
  the socket); the puller (:mod:`kvcache.transfer.rpc_pull`: its own HTTP/2 connection, read
  into one 32 MiB buffer) checks and writes each chunk into its destination block straight
  from that buffer as it arrives, one chunk per event-loop turn, and stops reading meanwhile.
- Any failure ends the stream with one last chunk carrying only ``error``: NOT_FOUND for an
  unknown, released or expired handle (also when the handle is released or cancelled while
  being streamed: the holder stops at the next chunk), INVALID_ARGUMENT for a block id not in
  the handle or a layout mismatch (the message names the fields), INTERNAL otherwise.
- The puller checks every chunk: block id and layer range are the next ones expected, the
  size is the layout's, the crc32 matches. Any mismatch, an error chunk, a stream that ends
  early, a transport error or the deadline raises a
  :class:`~kvcache.transfer.errors.KvTransferError`; the destination blocks then hold no usable
  data and the caller frees them.
- Cancel and timeout: the puller cancelling its call (its request cancelled, or ``timeout_s``
  passed) only ends the stream; the holder closes its lease and the handle **stays pinned**
  until ``ReleaseHandle`` or its TTL. :func:`pull_grpc` never writes into the destination
  after it has returned or raised.
- ``ReleaseHandle`` ends the handle (``released`` false when it was unknown or already ended).
  :func:`pull_grpc` does not release; :func:`kvcache.transfer.puller.pull` does, always.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence

import grpc

from ferry.v1 import worker_pb2, worker_pb2_grpc
from kvcache.transfer.chunk_codec import (
    crc32,
    decode_chunk,
    encode_chunk,
    encode_chunk_parts,
    encode_error,
)
from kvcache.transfer.errors import (
    HandleNotFound,
    KvLayoutMismatch,
    KvTransferError,
    TransferIntegrityError,
    TransferTimeout,
    TransportUnavailable,
)
from kvcache.transfer.handles import HandleRegistry, KvHandleInfo
from kvcache.transfer.layout import KvCacheView
from kvcache.transfer.result import PullResult, check_pull_args
from kvcache.transfer.rpc_pull import RpcStatus, pull_stream
from kvcache.transfer.wire import error_from_proto, layout_from_proto, layout_to_proto

log = logging.getLogger(__name__)

SERVICE = "ferry.v1.KvTransfer"
PULL_METHOD = f"/{SERVICE}/PullBlocks"
RELEASE_METHOD = f"/{SERVICE}/ReleaseHandle"
DEFAULT_MAX_CHUNK_BYTES = 4 << 20
# Chunks carry up to max_chunk_bytes of data plus a few bytes of framing (grpc's default
# receive limit, 4 MiB, would refuse a full one). Large HTTP/2 frames and stream windows keep
# a multi-megabyte chunk from being cut into 16 KiB frames and waiting on window updates;
# large TCP reads let a chunk arrive in one buffer, which gRPC's Python layer then hands over
# without joining pieces (measured: one memory copy fewer per chunk on the puller).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.http2.lookahead_bytes", 16 << 20),
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 256 << 10),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
]
# For the holder's server (shared with the worker's other services): what sending large chunks
# needs, and not the puller's large read buffers, which would cost every small request.
SERVER_OPTIONS = CHANNEL_OPTIONS[:4]


class KvTransferServicer(worker_pb2_grpc.KvTransferServicer):
    """The holder's ``KvTransfer`` service over its handle registry and KV cache view.

    Register it with :meth:`add_to_server` (chunks then go out pre-serialized, see
    :mod:`kvcache.transfer.chunk_codec`); the generated ``add_KvTransferServicer_to_server``
    works too, through the slower :meth:`PullBlocks` that yields ``KvChunk`` messages. Chunks
    are read from the cache and checksummed on the event loop, one at a time as gRPC takes
    them (about a millisecond per 2 MiB chunk; measured here, handing them to a thread pool
    cost more in wake-ups than it saved). Options for the server: :data:`SERVER_OPTIONS`.
    """

    def __init__(self, registry: HandleRegistry, view: KvCacheView, *,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, gather: bool = False) -> None:
        self.registry = registry
        self.view = view
        self.layer_groups = view.layout.layer_groups(max_chunk_bytes)
        self.chunks_read = 0  # chunks taken from the cache since start (tests watch the pacing)
        # True: chunks go out as lists of buffers (header, cache views, crc), which a
        # ferry.rpc server writes without joining them; grpc.aio takes bytes only.
        self.gather = gather

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            "PullBlocks": grpc.unary_stream_rpc_method_handler(
                self.pull_blocks_raw, request_deserializer=worker_pb2.PullRequest.FromString,
                response_serializer=None),
            "ReleaseHandle": grpc.unary_unary_rpc_method_handler(
                self.ReleaseHandle,
                request_deserializer=worker_pb2.ReleaseHandleRequest.FromString,
                response_serializer=worker_pb2.ReleaseHandleResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def close(self) -> None:
        """Nothing to release today; kept so a worker's shutdown path need not change."""

    # -- PullBlocks -----------------------------------------------------------------------------

    async def PullBlocks(self, request, context):
        """The generated-stub form: yields ``KvChunk`` messages."""
        async for raw in self.pull_blocks_raw(request, context):
            yield worker_pb2.KvChunk.FromString(raw if isinstance(raw, bytes) else b"".join(raw))

    async def pull_blocks_raw(self, request, context):
        """PullBlocks yielding serialized KvChunks (see the module docstring)."""
        try:
            lease = self.registry.lease(request.handle_id)
        except HandleNotFound as exc:
            yield encode_error("NOT_FOUND", str(exc))
            return
        try:
            problem = self._check_request(request, lease.info)
            if problem is not None:
                yield encode_error("INVALID_ARGUMENT", problem)
                return
            block_ids = list(request.block_ids) or list(lease.info.block_ids)
            for block_id in block_ids:
                for start, end in self.layer_groups:
                    if not lease.alive:
                        yield encode_error(
                            "NOT_FOUND",
                            f"KV handle {request.handle_id!r} was {lease.ended_reason} during "
                            "the pull; its blocks are no longer pinned",
                        )
                        return
                    yield self._chunk(block_id, start, end)  # resumes once gRPC took it
        except Exception as exc:  # a bug or a broken cache: say so in the stream
            log.exception("PullBlocks of handle %s failed", request.handle_id)
            yield encode_error("INTERNAL", f"reading KV blocks failed: {exc}")
        finally:
            lease.close()

    def _check_request(self, request, info: KvHandleInfo) -> str | None:
        lay = self.view.layout
        if info.block_size != lay.block_size:
            return (f"handle {info.handle_id!r} has block_size {info.block_size}, this worker's "
                    f"cache {lay.block_size}")
        unknown = sorted(set(request.block_ids) - set(info.block_ids))
        if unknown:
            return f"block ids {unknown} are not in handle {info.handle_id!r}"
        if request.HasField("layout"):
            try:
                theirs = layout_from_proto(request.layout)
                theirs.check_compatible(lay, this="puller", that="holder")
            except (KvLayoutMismatch, ValueError) as exc:
                return str(exc)
        return None

    def _chunk(self, block_id: int, start: int, end: int):
        pieces = self.view.block_pieces(block_id, start, end)
        raw = encode_chunk_parts(block_id, start, end, pieces) if self.gather \
            else encode_chunk(block_id, start, end, pieces)
        self.chunks_read += 1
        return raw

    # -- ReleaseHandle --------------------------------------------------------------------------

    async def ReleaseHandle(self, request, context):
        return worker_pb2.ReleaseHandleResponse(released=self.registry.release(request.handle_id))


# -- puller side ----------------------------------------------------------------------------------

_channels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def channel_for(address: str) -> grpc.aio.Channel:
    """A cached ``grpc.aio`` channel to ``address`` for the running event loop."""
    per_loop = _channels.setdefault(asyncio.get_running_loop(), {})
    channel = per_loop.get(address)
    if channel is None:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        per_loop[address] = channel
    return channel


async def close_channels() -> None:
    """Close the running loop's cached channels (shutdown, tests)."""
    per_loop = _channels.pop(asyncio.get_running_loop(), {})
    for channel in per_loop.values():
        await channel.close()


def _rpc_error(exc: grpc.aio.AioRpcError, address: str, what: str) -> KvTransferError:
    return _status_error(exc.code().name, exc.details(), address, what)


def _status_error(code: str, details: str, address: str, what: str) -> KvTransferError:
    text = f"{what} at {address} failed: {code} {details}"
    if code == "DEADLINE_EXCEEDED":
        return TransferTimeout(text)
    if code == "UNAVAILABLE":
        return TransportUnavailable(text)
    return KvTransferError(text, code=code if code in (
        "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "ABORTED",
        "INTERNAL") else "INTERNAL")


class _ChunkChecker:
    """The puller's bookkeeping: which chunk must come next, and writing it."""

    def __init__(self, address: str, view: KvCacheView, src: list[int], dst: list[int]) -> None:
        self.address, self.view, self.src, self.dst = address, view, src, dst
        self.index = 0  # position in src of the block the next chunk belongs to
        self.next_layer = 0
        self.received = 0

    def accept(self, raw: bytes) -> tuple[int, int, int, memoryview, int]:
        """Check a chunk's place in the stream; return what :meth:`write` needs."""
        try:
            chunk = decode_chunk(raw)
        except ValueError as exc:
            raise TransferIntegrityError(f"KV holder {self.address} sent a bad chunk: {exc}")
        if chunk.error is not None:
            raise error_from_proto(chunk.error, where=self.address)
        lay, src = self.view.layout, self.src
        if self.index >= len(src):
            raise TransferIntegrityError(
                f"KV holder {self.address} sent more chunks than the {len(src)} blocks asked for")
        if (chunk.block_id != src[self.index] or chunk.layer_start != self.next_layer
                or not self.next_layer < chunk.layer_end <= lay.num_layers):
            raise TransferIntegrityError(
                f"KV holder {self.address} sent block {chunk.block_id} layers "
                f"[{chunk.layer_start}, {chunk.layer_end}), expected block {src[self.index]} "
                f"from layer {self.next_layer} of {lay.num_layers}")
        expected = (chunk.layer_end - chunk.layer_start) * lay.layer_block_nbytes
        if chunk.data.nbytes != expected:
            raise TransferIntegrityError(
                f"chunk of block {chunk.block_id} layers [{chunk.layer_start}, "
                f"{chunk.layer_end}) from {self.address} holds {chunk.data.nbytes} bytes, the "
                f"layout needs {expected}")
        job = (self.dst[self.index], chunk.layer_start, chunk.layer_end, chunk.data, chunk.crc32)
        self.received += expected
        self.next_layer = chunk.layer_end
        if self.next_layer == lay.num_layers:
            self.index, self.next_layer = self.index + 1, 0
        return job

    def write(self, job: tuple[int, int, int, memoryview, int]) -> None:
        """Verify a chunk's crc32 and write it into its destination block."""
        dst_block, start, end, data, expected_crc = job
        if crc32(data) != expected_crc:
            raise TransferIntegrityError(
                f"crc32 mismatch in a chunk (destination block {dst_block}, layers [{start}, "
                f"{end})) from {self.address}: the transfer is corrupt")
        self.view.write_block_bytes(dst_block, start, end, data)

    def complete(self) -> bool:
        return self.view.layout.num_layers == 0 or self.index == len(self.src)


async def pull_grpc(
    address: str,
    handle: KvHandleInfo,
    dest_view: KvCacheView,
    dest_block_ids: Sequence[int],
    *,
    timeout_s: float,
    src_block_ids: Sequence[int] | None = None,
) -> PullResult:
    """Pull ``src_block_ids`` (default: all of the handle's blocks) from the holder's
    KvTransfer service at ``address`` into ``dest_block_ids`` of ``dest_view`` (same length,
    in order). Raises KvTransferError on any failure (see the module docstring); does not
    release the handle. Each chunk is checked and written as it arrives, on the event loop
    (about a millisecond per 2 MiB chunk); none is written after this returns or raises."""
    src, dst = check_pull_args(handle, dest_view, dest_block_ids, src_block_ids)
    request = worker_pb2.PullRequest(
        handle_id=handle.handle_id,
        block_ids=src if src_block_ids is not None else [],
        layout=layout_to_proto(dest_view.layout),
    )
    checker = _ChunkChecker(address, dest_view, src, dst)
    started = time.perf_counter()
    what = f"pulling KV handle {handle.handle_id!r}"
    try:
        async with asyncio.timeout(timeout_s):
            await pull_stream(address, PULL_METHOD, request.SerializeToString(),
                              lambda raw: checker.write(checker.accept(raw)))
        if dest_view.device.type == "cuda":
            import torch

            torch.cuda.synchronize(dest_view.device)
    except RpcStatus as exc:
        raise _status_error(exc.code, exc.message, address, what) from exc
    except TimeoutError as exc:
        raise TransferTimeout(f"{what} at {address} failed: DEADLINE_EXCEEDED after "
                              f"{timeout_s:g} s") from exc
    except OSError as exc:
        raise TransportUnavailable(f"{what} at {address} failed: UNAVAILABLE {exc}") from exc
    if not checker.complete():
        raise TransferIntegrityError(
            f"KV stream from {address} ended after {checker.index} of {len(src)} blocks")
    return PullResult(nbytes=checker.received, blocks=len(dst),
                      seconds=time.perf_counter() - started, transport="grpc")


async def release_remote(address: str, handle_id: str, *, timeout_s: float = 5.0) -> bool:
    """``KvTransfer.ReleaseHandle`` on the holder at ``address``: True when this call ended the
    handle, False when it was already gone. Raises KvTransferError when the holder cannot be
    reached (it then unpins at its TTL, or died with its blocks)."""
    stub = worker_pb2_grpc.KvTransferStub(channel_for(address))
    try:
        reply = await stub.ReleaseHandle(
            worker_pb2.ReleaseHandleRequest(handle_id=handle_id), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise _rpc_error(exc, address, f"releasing KV handle {handle_id!r}") from exc
    return reply.released
