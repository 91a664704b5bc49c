"""Wire forms of the transfer layer: KvHandle and KvCacheLayout conversions, error chunks,
transport addresses, and the KvChunk codec (byte-identical to protobuf both ways)."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from ferry.v1 import common_pb2, worker_pb2
from kvcache.transfer.address import TransportAddress, parse_transport_address
from kvcache.transfer.chunk_codec import crc32, decode_chunk, encode_chunk, encode_error
from kvcache.transfer.errors import HandleNotFound, KvLayoutMismatch, TransferTimeout
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvLayout
from kvcache.transfer.wire import (
    error_from_proto,
    error_to_proto,
    handle_from_proto,
    handle_to_proto,
    layout_from_proto,
    layout_to_proto,
)


def test_handle_round_trips_through_proto_and_bytes():
    info = KvHandleInfo("kvh-1", "prefill-3", (7, 2, 2**32 - 1), (0, 2**64 - 1), 40, 16,
                        "shm://ferry-kv-a@10.0.0.5:7001")
    message = handle_to_proto(info)
    assert list(message.block_ids) == [7, 2, 2**32 - 1]
    assert list(message.block_hashes) == [0, 2**64 - 1]
    assert message.transport_address == "shm://ferry-kv-a@10.0.0.5:7001"
    parsed = worker_pb2.KvHandle.FromString(message.SerializeToString())
    assert handle_from_proto(parsed) == info


def test_a_malformed_received_handle_is_refused_naming_the_field():
    message = handle_to_proto(KvHandleInfo("h", "w", (1, 2), (5,), 20, 16, "a:1"))
    message.block_size = 0
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        handle_from_proto(message)
    message.block_size = 16
    del message.block_hashes[:]
    with pytest.raises(ValueError, match="needs 1 block hashes"):
        handle_from_proto(message)


def test_layout_round_trips_through_proto():
    lay = KvLayout(30, 16, 3, 64, "bfloat16", 1234)
    message = layout_to_proto(lay)
    assert layout_from_proto(worker_pb2.KvCacheLayout.FromString(message.SerializeToString())) \
        == lay
    request = worker_pb2.PullRequest(handle_id="h")
    assert not request.HasField("layout")
    with pytest.raises(ValueError, match="dtype ''"):
        layout_from_proto(worker_pb2.KvCacheLayout(num_layers=1, block_size=1, num_kv_heads=1,
                                                   head_dim=1, num_blocks=1))


def test_error_chunks_map_to_exception_types():
    error = error_to_proto("NOT_FOUND", "KV handle 'x' was released")
    assert error.code == common_pb2.ERROR_CODE_NOT_FOUND
    exc = error_from_proto(error, where="127.0.0.1:9")
    assert isinstance(exc, HandleNotFound) and exc.code == "NOT_FOUND"
    assert str(exc) == "KV holder 127.0.0.1:9: KV handle 'x' was released"
    assert isinstance(error_from_proto(error_to_proto("INVALID_ARGUMENT", "m"), where="a"),
                      KvLayoutMismatch)
    assert isinstance(error_from_proto(error_to_proto("DEADLINE_EXCEEDED", "m"), where="a"),
                      TransferTimeout)


@pytest.mark.parametrize("address, parsed", [
    ("127.0.0.1:7001", TransportAddress("grpc", "127.0.0.1:7001")),
    ("grpc://node-2.local:80", TransportAddress("grpc", "node-2.local:80")),
    ("[::1]:7001", TransportAddress("grpc", "[::1]:7001")),
    ("shm://ferry-kv-p0@127.0.0.1:7001", TransportAddress("shm", "127.0.0.1:7001", "ferry-kv-p0")),
    ("cuda-ipc://kv.p_1@host:9", TransportAddress("cuda-ipc", "host:9", "kv.p_1")),
])
def test_transport_addresses_parse_and_print_back(address, parsed):
    assert parse_transport_address(address) == parsed
    assert parse_transport_address(str(parsed)) == parsed


@pytest.mark.parametrize("address, message", [
    ("", "empty KV transport address"),
    ("shm://ferry-kv", r"lacks the holder's gRPC address: write shm://NAME@host:port"),
    ("rdma://x@h:1", "unknown KV transport"),
    ("shm://bad/name@h:1", "must be 1-200 letters"),
    ("shm://n@nohostport", "needs the holder's gRPC address as host:port"),
    ("127.0.0.1:0", "host:port"),
])
def test_bad_transport_addresses_say_what_to_write(address, message):
    with pytest.raises(ValueError, match=message):
        parse_transport_address(address)


def test_crc32_equals_zlib():
    data = os.urandom(100_000)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[5000:], crc32(data[:5000])) == zlib.crc32(data)


@pytest.mark.parametrize("block_id, start, end, sizes", [
    (0, 0, 1, [0]), (3, 0, 2, [100, 0, 7]), (2**32 - 1, 200, 201, [1 << 16]), (9, 1, 5, [1])])
def test_encoded_chunks_are_byte_identical_to_protobuf(block_id, start, end, sizes):
    pieces = [np.frombuffer(os.urandom(n), dtype=np.uint8) for n in sizes]
    data = b"".join(p.tobytes() for p in pieces)
    raw = encode_chunk(block_id, start, end, pieces)
    reference = worker_pb2.KvChunk(block_id=block_id, layer_start=start, layer_end=end,
                                   data=data, crc32=zlib.crc32(data))
    assert raw == reference.SerializeToString()
    decoded = decode_chunk(raw)
    assert (decoded.block_id, decoded.layer_start, decoded.layer_end) == (block_id, start, end)
    assert decoded.data.tobytes() == data and decoded.crc32 == zlib.crc32(data)
    assert decoded.error is None


def test_decode_reads_error_chunks_and_fields_in_any_order():
    decoded = decode_chunk(encode_error("NOT_FOUND", "gone"))
    assert decoded.error.code == common_pb2.ERROR_CODE_NOT_FOUND
    assert decoded.error.message == "gone" and decoded.data.nbytes == 0
    # crc32 before data, block id last: still the same chunk
    raw = bytes([0x2D]) + (1234).to_bytes(4, "little") + bytes([0x22, 2]) + b"hi" + \
        bytes([0x08, 5])
    decoded = decode_chunk(raw)
    assert (decoded.block_id, decoded.crc32, decoded.data.tobytes()) == (5, 1234, b"hi")


@pytest.mark.parametrize("raw", [b"\x22\x05ab", b"\x08", b"\x2d\x01", b"\x0b"])
def test_decode_refuses_truncated_or_foreign_bytes(raw):
    with pytest.raises(ValueError):
        decode_chunk(raw)


def test_tune_malloc_applies_on_glibc_and_checks_its_arguments():
    import platform

    from kvcache.transfer.tuning import tune_malloc

    if platform.libc_ver()[0] == "glibc":
        assert tune_malloc() is True
    with pytest.raises(ValueError, match="positive byte counts"):
        tune_malloc(mmap_threshold=0)
