"""``ferry.v1.KvChunk`` on the wire without protobuf copies, and the crc32 the chunks carry.

A KV chunk is megabytes of payload behind a dozen bytes of header. Building it as a protobuf
message copies the payload twice (into the message, then into the serialized string) and
parsing copies it again; here the sender joins the header and the cache's memory into the
serialized bytes in one copy, and the receiver slices the payload out of the received bytes
without copying. The bytes are exactly what ``KvChunk.SerializeToString`` writes (fields in
number order, zero values omitted) and :func:`decode_chunk` reads anything protobuf writes,
so stock ``ferry.v1`` stubs interoperate with this codec in both directions.

``crc32`` is zlib's CRC-32 (the value ``zlib.crc32`` returns), computed with ISA-L or zlib-ng
when one of them is installed (4-5x faster than zlib on CPUs with carry-less multiply), with
zlib otherwise; the results are identical.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.v1 import common_pb2, worker_pb2

try:  # the fastest implementation present; all compute the same CRC-32
    from isal.isal_zlib import crc32 as _crc32

    CRC32_IMPL = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from zlib_ng.zlib_ng import crc32 as _crc32

        CRC32_IMPL = "zlib-ng"
    except ImportError:
        from zlib import crc32 as _crc32

        CRC32_IMPL = "zlib"

_FIXED32 = struct.Struct("<I")
_TAG_BLOCK_ID, _TAG_LAYER_START, _TAG_LAYER_END = 0x08, 0x10, 0x18
_TAG_DATA, _TAG_CRC32, _TAG_ERROR = 0x22, 0x2D, 0x32


def crc32(data, value: int = 0) -> int:
    """zlib's CRC-32 of ``data`` (any buffer), continuing from ``value``."""
    return _crc32(data, value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(block_id: int, layer_start: int, layer_end: int,
                 pieces: Sequence) -> bytes:
    """The serialized KvChunk whose data is the concatenation of ``pieces`` (buffers), with its
    crc32; one copy of the payload (and one read for the crc)."""
    return b"".join(encode_chunk_parts(block_id, layer_start, layer_end, pieces))


def encode_chunk_parts(block_id: int, layer_start: int, layer_end: int,
                       pieces: Sequence) -> list:
    """:func:`encode_chunk`'s bytes as a list of buffers (the header, ``pieces`` themselves,
    the crc32 trailer): no copy of the payload, for a server that writes gathered buffers."""
    size = sum(memoryview(p).nbytes for p in pieces)
    header = bytearray()
    for tag, value in ((_TAG_BLOCK_ID, block_id), (_TAG_LAYER_START, layer_start),
                       (_TAG_LAYER_END, layer_end)):
        if value:
            header += bytes((tag,)) + _varint(value)
    if size:
        header += bytes((_TAG_DATA,)) + _varint(size)
    crc = 0
    for piece in pieces:
        crc = crc32(piece, crc)
    trailer = bytes((_TAG_CRC32,)) + _FIXED32.pack(crc) if crc else b""
    return [bytes(header), *pieces, trailer]


def encode_error(code: str, message: str) -> bytes:
    """A serialized KvChunk carrying only an error (``code`` as ``"NOT_FOUND"``)."""
    error = common_pb2.Error(code=common_pb2.ErrorCode.Value(f"ERROR_CODE_{code}"),
                             message=message)
    return worker_pb2.KvChunk(error=error).SerializeToString()


@dataclass(frozen=True)
class DecodedChunk:
    """A parsed KvChunk; ``data`` is a zero-copy view into the received bytes."""

    block_id: int
    layer_start: int
    layer_end: int
    data: memoryview
    crc32: int
    error: common_pb2.Error | None


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("truncated or overlong varint in a KvChunk")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def decode_chunk(raw: bytes) -> DecodedChunk:
    """Parse a serialized KvChunk (ValueError when it is not one)."""
    fields = {1: 0, 2: 0, 3: 0, 5: 0}
    data = memoryview(b"")
    error = None
    pos, end = 0, len(raw)
    view = memoryview(raw)
    while pos < end:
        key, pos = _read_varint(raw, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(raw, pos)
            if number in (1, 2, 3):
                fields[number] = value & 0xFFFFFFFF
        elif wire_type == 2:
            length, pos = _read_varint(raw, pos)
            if pos + length > end:
                raise ValueError("truncated length-delimited field in a KvChunk")
            if number == 4:
                data = view[pos:pos + length]
            elif number == 6:
                error = common_pb2.Error.FromString(view[pos:pos + length].tobytes())
            pos += length
        elif wire_type == 5:
            if pos + 4 > end:
                raise ValueError("truncated fixed32 field in a KvChunk")
            if number == 5:
                fields[5] = _FIXED32.unpack_from(raw, pos)[0]
            pos += 4
        elif wire_type == 1:
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire_type} in a KvChunk")
    if pos != end:
        raise ValueError("truncated KvChunk")
    return DecodedChunk(fields[1], fields[2], fields[3], data, fields[5], error)
