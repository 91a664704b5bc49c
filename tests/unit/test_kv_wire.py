"""kvcache/wire.py: KV event batches and load reports survive the trip through ferry.v1 bytes."""

from __future__ import annotations

import pytest

from ferry.v1 import events_pb2
from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from kvcache.wire import (
    LoadReport,
    decode_kv_batch,
    decode_load_report,
    encode_kv_batch,
    encode_load_report,
    kv_batch_from_proto,
    kv_batch_to_proto,
    load_report_to_proto,
)

TOP = 2**64 - 1


def _batch() -> KvEventBatch:
    return KvEventBatch(
        seq=7,
        timestamp=1234.5,
        events=(
            BlockStored(block_hashes=(TOP, 0, 2**63), parent_hash=None),
            BlockStored(block_hashes=(5,), parent_hash=TOP),
            BlockStored(block_hashes=(6,), parent_hash=0),
            BlockRemoved(block_hashes=(TOP, 1)),
            AllBlocksCleared(),
        ),
    )


def test_kv_batch_round_trips_exactly_through_bytes():
    worker_id, batch = decode_kv_batch(encode_kv_batch("decode-0", _batch()))
    assert worker_id == "decode-0"
    assert batch == _batch()


def test_none_parent_is_absent_on_the_wire_and_zero_parent_is_present():
    message = kv_batch_to_proto("w", _batch())
    assert message.seq == 7 and message.worker_id == "w"
    assert [e.WhichOneof("event") for e in message.events] == [
        "stored", "stored", "stored", "removed", "cleared",
    ]  # fmt: skip
    assert not message.events[0].stored.HasField("parent_hash")
    assert message.events[1].stored.parent_hash == TOP
    assert message.events[2].stored.HasField("parent_hash")
    assert message.events[2].stored.parent_hash == 0
    assert list(message.events[0].stored.block_hashes) == [TOP, 0, 2**63]


def test_real_block_hashes_round_trip():
    hashes = tuple(hash_blocks(list(range(64)), BlockHashConfig(block_size=16, seed=2**64 - 2)))
    assert len(hashes) == 4 and max(hashes) >= 2**32  # really 64-bit values
    batch = KvEventBatch(seq=2**40, timestamp=0.0, events=(BlockStored(hashes, None),))
    assert decode_kv_batch(encode_kv_batch("p", batch)) == ("p", batch)


def test_empty_batch_round_trips():
    batch = KvEventBatch(seq=0, timestamp=0.0, events=())
    assert decode_kv_batch(encode_kv_batch("w", batch)) == ("w", batch)


@pytest.mark.parametrize(
    "event, field",
    [
        (BlockStored(block_hashes=(2**64,), parent_hash=None), "events[0].block_hashes[0]"),
        (BlockStored(block_hashes=(1, -1), parent_hash=None), "events[0].block_hashes[1]"),
        (BlockStored(block_hashes=(1,), parent_hash=2**64), "events[0].parent_hash"),
        (BlockRemoved(block_hashes=(-5,)), "events[0].block_hashes[0]"),
    ],
)
def test_hash_outside_uint64_names_the_field(event, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        encode_kv_batch("w", KvEventBatch(seq=0, timestamp=0.0, events=(event,)))


def test_bad_worker_id_seq_or_event_type_is_refused():
    with pytest.raises(ValueError, match="worker_id"):
        encode_kv_batch("", _batch())
    with pytest.raises(ValueError, match="seq"):
        encode_kv_batch("w", KvEventBatch(seq=-1, timestamp=0.0, events=()))
    with pytest.raises(TypeError, match="events\\[0\\] is a str"):
        encode_kv_batch("w", KvEventBatch(seq=0, timestamp=0.0, events=("stored",)))


def test_decoding_refuses_a_batch_without_worker_or_with_an_empty_event():
    with pytest.raises(ValueError, match="worker_id is empty"):
        kv_batch_from_proto(events_pb2.KvEventBatch(seq=1))
    message = events_pb2.KvEventBatch(worker_id="w", events=[events_pb2.KvEvent()])
    with pytest.raises(ValueError, match="events\\[0\\] has no event set"):
        kv_batch_from_proto(message)
    with pytest.raises(ValueError, match="not a ferry.v1.KvEventBatch"):
        decode_kv_batch(b"\xff\xff\xff")


def _report(**overrides) -> LoadReport:
    values = {
        "worker_id": "decode-1",
        "timestamp": 99.25,
        "waiting": 3,
        "running": 2**32 - 1,
        "kv_blocks_used": 10,
        "kv_blocks_total": 64,
        "active_prefill_tokens": 2**40,
        "active_decode_blocks": 9,
    }
    values.update(overrides)
    return LoadReport(**values)


def test_load_report_round_trips_field_for_field():
    report = _report()
    assert decode_load_report(encode_load_report(report)) == report
    message = load_report_to_proto(report)
    assert (message.worker_id, message.running, message.active_prefill_tokens) == (
        "decode-1", 2**32 - 1, 2**40,
    )  # fmt: skip
    assert report.kv_usage == 10 / 64
    assert _report(kv_blocks_used=0, kv_blocks_total=0).kv_usage == 0.0


def test_load_report_validation_says_what_is_wrong():
    with pytest.raises(ValueError, match="worker_id"):
        _report(worker_id="")
    with pytest.raises(ValueError, match="waiting must be an integer >= 0"):
        _report(waiting=-1)
    with pytest.raises(
        ValueError, match="kv_blocks_used \\(65\\) exceeds kv_blocks_total \\(64\\)"
    ):
        _report(kv_blocks_used=65)
    with pytest.raises(ValueError, match="running=4294967296 does not fit"):
        encode_load_report(_report(running=2**32))
    with pytest.raises(ValueError, match="not a ferry.v1.LoadReport"):
        decode_load_report(b"\x08")
