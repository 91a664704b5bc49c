"""Wire form of the transfer layer: :class:`KvHandleInfo` and :class:`KvLayout` to and from
``ferry.v1.KvHandle`` and ``ferry.v1.KvCacheLayout`` (proto/ferry/v1/worker.proto), and the
``ferry.v1.Error`` a failed pull carries.

Pure conversions, no I/O. Decoding validates exactly as the dataclasses do and raises
ValueError naming the field; an unset message (``HasField`` false) decodes to None.
"""

from __future__ import annotations

from ferry.v1 import common_pb2, worker_pb2
from kvcache.transfer.errors import (
    HandleNotFound,
    KvLayoutMismatch,
    KvTransferError,
    TransferIntegrityError,
    TransferTimeout,
    TransportUnavailable,
)
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvLayout


def handle_to_proto(info: KvHandleInfo) -> worker_pb2.KvHandle:
    return worker_pb2.KvHandle(
        handle_id=info.handle_id,
        worker_id=info.worker_id,
        block_ids=info.block_ids,
        block_hashes=info.block_hashes,
        num_tokens=info.num_tokens,
        transport_address=info.transport_address,
        block_size=info.block_size,
    )


def handle_from_proto(message: worker_pb2.KvHandle) -> KvHandleInfo:
    """A received handle, validated (ValueError naming the field when it is malformed)."""
    return KvHandleInfo(
        handle_id=message.handle_id,
        worker_id=message.worker_id,
        block_ids=tuple(message.block_ids),
        block_hashes=tuple(message.block_hashes),
        num_tokens=message.num_tokens,
        block_size=message.block_size,
        transport_address=message.transport_address,
    )


def layout_to_proto(layout: KvLayout) -> worker_pb2.KvCacheLayout:
    return worker_pb2.KvCacheLayout(
        num_layers=layout.num_layers, block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype,
        num_blocks=layout.num_blocks,
    )


def layout_from_proto(message: worker_pb2.KvCacheLayout) -> KvLayout:
    return KvLayout(
        num_layers=message.num_layers, block_size=message.block_size,
        num_kv_heads=message.num_kv_heads, head_dim=message.head_dim, dtype=message.dtype,
        num_blocks=message.num_blocks,
    )


_ERROR_TYPES: dict[str, type[KvTransferError]] = {
    "NOT_FOUND": HandleNotFound,
    "INVALID_ARGUMENT": KvLayoutMismatch,
    "UNAVAILABLE": TransportUnavailable,
    "DEADLINE_EXCEEDED": TransferTimeout,
    "INTERNAL": TransferIntegrityError,
}


def error_to_proto(code: str, message: str) -> common_pb2.Error:
    """``code`` is an ErrorCode name without its prefix (``"NOT_FOUND"``)."""
    return common_pb2.Error(code=common_pb2.ErrorCode.Value(f"ERROR_CODE_{code}"), message=message)


def error_from_proto(error: common_pb2.Error, *, where: str) -> KvTransferError:
    """The exception a puller raises for an error chunk from the holder at ``where``."""
    code = common_pb2.ErrorCode.Name(error.code).removeprefix("ERROR_CODE_")
    cls = _ERROR_TYPES.get(code, KvTransferError)
    return cls(f"KV holder {where}: {error.message}", code=code)
