"""Wire form of the event plane: kvcache's KV event batches and load reports to and from the
``ferry.v1`` messages of proto/ferry/v1/events.proto, and to and from bytes.

Pure conversions, no I/O. What travels and what the receiver gets back:

- A :class:`~kvcache.events.KvEventBatch` travels with the id of the worker that recorded it
  (``ferry.v1.KvEventBatch.worker_id``); decoding gives ``(worker_id, batch)`` back, equal to
  what was encoded. Block hashes are uint64 on the wire; a ``parent_hash`` of None travels as
  an absent field (not 0: 0 is a valid hash).
- A :class:`LoadReport` carries its ``worker_id`` itself and round-trips field for field.

Encoding a value the wire cannot carry (a hash outside [0, 2**64), a count above uint32) is a
caller's bug and raises ValueError naming the field. Decoding bytes that are not such a message
raises ValueError too; a receiver decides whether to log and skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from google.protobuf.message import DecodeError

from ferry.v1 import events_pb2
from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class LoadReport:
    """One worker's load at one moment (the router's cost function reads it; the Python form of
    ``ferry.v1.LoadReport``, the one class for it on both sides of the event plane).

    ``timestamp`` is in seconds (wall clock, or the mocker's virtual clock): it orders one
    worker's reports, and a router keeps the newest per worker. ``kv_blocks_total`` 0 means
    unknown (a router then uses the capacity the worker registered with).
    """

    worker_id: str
    timestamp: float
    waiting: int = 0  # requests queued, not yet scheduled
    running: int = 0  # requests scheduled (prefilling or decoding)
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    active_prefill_tokens: int = 0  # prompt tokens not prefilled yet (queued ones included)
    active_decode_blocks: int = 0  # KV blocks held by decoding requests

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, str) or not self.worker_id:
            raise ValueError(
                f"LoadReport.worker_id must be a non-empty string, got {self.worker_id!r}"
            )
        if isinstance(self.timestamp, bool) or not isinstance(self.timestamp, (int, float)) \
                or not math.isfinite(self.timestamp):
            raise ValueError(f"LoadReport.timestamp must be a finite number, got "
                             f"{self.timestamp!r}")
        for f in fields(self)[2:]:
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LoadReport.{f.name} must be an integer >= 0, got {value!r}")
        if self.kv_blocks_total and self.kv_blocks_used > self.kv_blocks_total:
            raise ValueError(
                f"LoadReport.kv_blocks_used ({self.kv_blocks_used}) exceeds kv_blocks_total "
                f"({self.kv_blocks_total})"
            )

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV pool in use (0.0 for an empty pool)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


# ----------------------------------------------------------------------------- KV event batches


def _check_hash(value: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise ValueError(f"{where} must be an integer in [0, 2**64), got {value!r}")
    return value


def _event_to_proto(event: KvEvent, index: int) -> events_pb2.KvEvent:
    message = events_pb2.KvEvent()
    where = f"events[{index}]"
    if isinstance(event, BlockStored):
        message.stored.block_hashes.extend(
            _check_hash(h, f"{where}.block_hashes[{i}]") for i, h in enumerate(event.block_hashes)
        )
        if event.parent_hash is not None:
            message.stored.parent_hash = _check_hash(event.parent_hash, f"{where}.parent_hash")
    elif isinstance(event, BlockRemoved):
        message.removed.block_hashes.extend(
            _check_hash(h, f"{where}.block_hashes[{i}]") for i, h in enumerate(event.block_hashes)
        )
    elif isinstance(event, AllBlocksCleared):
        message.cleared.SetInParent()
    else:
        raise TypeError(
            f"{where} is a {type(event).__name__}; expected BlockStored, BlockRemoved or "
            "AllBlocksCleared"
        )
    return message


def _event_from_proto(message: events_pb2.KvEvent, index: int) -> KvEvent:
    kind = message.WhichOneof("event")
    if kind == "stored":
        parent = message.stored.parent_hash if message.stored.HasField("parent_hash") else None
        return BlockStored(block_hashes=tuple(message.stored.block_hashes), parent_hash=parent)
    if kind == "removed":
        return BlockRemoved(block_hashes=tuple(message.removed.block_hashes))
    if kind == "cleared":
        return AllBlocksCleared()
    raise ValueError(f"KvEventBatch.events[{index}] has no event set (stored, removed or cleared)")


def kv_batch_to_proto(worker_id: str, batch: KvEventBatch) -> events_pb2.KvEventBatch:
    """The wire message of ``batch`` as recorded by ``worker_id``."""
    if not isinstance(worker_id, str) or not worker_id:
        raise ValueError(f"worker_id must be a non-empty string, got {worker_id!r}")
    if (
        isinstance(batch.seq, bool)
        or not isinstance(batch.seq, int)
        or not 0 <= batch.seq <= _U64_MAX
    ):
        raise ValueError(f"KvEventBatch.seq must be an integer in [0, 2**64), got {batch.seq!r}")
    return events_pb2.KvEventBatch(
        worker_id=worker_id,
        seq=batch.seq,
        timestamp=batch.timestamp,
        events=[_event_to_proto(event, i) for i, event in enumerate(batch.events)],
    )


def kv_batch_from_proto(message: events_pb2.KvEventBatch) -> tuple[str, KvEventBatch]:
    """``(worker_id, batch)`` read back from the wire message."""
    if not message.worker_id:
        raise ValueError("KvEventBatch.worker_id is empty; every batch must name its worker")
    batch = KvEventBatch(
        seq=message.seq,
        timestamp=message.timestamp,
        events=tuple(_event_from_proto(event, i) for i, event in enumerate(message.events)),
    )
    return message.worker_id, batch


def encode_kv_batch(worker_id: str, batch: KvEventBatch) -> bytes:
    return kv_batch_to_proto(worker_id, batch).SerializeToString()


def decode_kv_batch(data: bytes) -> tuple[str, KvEventBatch]:
    message = events_pb2.KvEventBatch()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a ferry.v1.KvEventBatch ({len(data)} bytes): {exc}") from exc
    return kv_batch_from_proto(message)


# -------------------------------------------------------------------------------- load reports


def load_report_to_proto(report: LoadReport) -> events_pb2.LoadReport:
    for name in ("waiting", "running", "kv_blocks_used", "kv_blocks_total", "active_decode_blocks"):
        if getattr(report, name) > _U32_MAX:
            raise ValueError(
                f"LoadReport.{name}={getattr(report, name)} does not fit the wire's uint32"
            )
    if report.active_prefill_tokens > _U64_MAX:
        raise ValueError(
            f"LoadReport.active_prefill_tokens={report.active_prefill_tokens} does not fit uint64"
        )
    return events_pb2.LoadReport(
        worker_id=report.worker_id,
        timestamp=report.timestamp,
        waiting=report.waiting,
        running=report.running,
        kv_blocks_used=report.kv_blocks_used,
        kv_blocks_total=report.kv_blocks_total,
        active_prefill_tokens=report.active_prefill_tokens,
        active_decode_blocks=report.active_decode_blocks,
    )


def load_report_from_proto(message: events_pb2.LoadReport) -> LoadReport:
    return LoadReport(
        worker_id=message.worker_id,
        timestamp=message.timestamp,
        waiting=message.waiting,
        running=message.running,
        kv_blocks_used=message.kv_blocks_used,
        kv_blocks_total=message.kv_blocks_total,
        active_prefill_tokens=message.active_prefill_tokens,
        active_decode_blocks=message.active_decode_blocks,
    )


def encode_load_report(report: LoadReport) -> bytes:
    return load_report_to_proto(report).SerializeToString()


def decode_load_report(data: bytes) -> LoadReport:
    message = events_pb2.LoadReport()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a ferry.v1.LoadReport ({len(data)} bytes): {exc}") from exc
    return load_report_from_proto(message)
