"""HTTP/2 framing (RFC 9113) and the gRPC pieces on top of it, as the server needs them.

Frames are built with :func:`frame` and read with :data:`FRAME_HEADER` (``>I B I``: length << 8
| type, flags, stream id). The server's header blocks are HPACK (RFC 7541) without Huffman and
without indexing, so it keeps no encoder state: every block is static bytes plus literals.
The one exception is the first block a connection sends, which starts with a dynamic table
size update to 0 (:data:`TABLE_SIZE_ZERO`): the server's table is then empty for good, whatever
SETTINGS_HEADER_TABLE_SIZE the peer later announces.

gRPC over HTTP/2 (the PROTOCOL-HTTP2 document of grpc/grpc): a message is a 5-byte prefix
(compressed flag, big-endian length) and its bytes; a response is the HEADERS block of
:func:`response_headers`, DATA with the messages, and a trailers block
(:func:`trailers`, END_STREAM) with ``grpc-status`` and, when not OK, ``grpc-message``
(percent-encoded UTF-8). An answer with no message may be *trailers only*: one HEADERS block
with everything (:func:`trailers_only`).
"""

from __future__ import annotations

import enum
import socket
import struct
from urllib.parse import unquote

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">I B I")
MESSAGE_PREFIX = struct.Struct(">BI")

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers.
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1


class H2Error(enum.IntEnum):
    """HTTP/2 error codes (RST_STREAM and GOAWAY)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class Status(enum.IntEnum):
    """gRPC status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload) << 8 | ftype, flags, stream_id) + payload


def read_frames(buf: bytearray) -> tuple[list[tuple[int, int, int, bytes]], int, int]:
    """The whole frames at the start of ``buf``: ``[(type, flags, stream id, payload)]``, the
    bytes they take, and the length announced by a frame over DEFAULT_MAX_FRAME where one
    comes next (0: none; nothing after it is read)."""
    frames = []
    pos, end = 0, len(buf)
    unpack = FRAME_HEADER.unpack_from
    while end - pos >= 9:
        lt, flags, sid = unpack(buf, pos)
        length = lt >> 8
        if length > DEFAULT_MAX_FRAME:
            return frames, pos, length
        if end - pos - 9 < length:
            break
        start = pos + 9
        pos = start + length
        frames.append((lt & 0xFF, flags, sid & 0x7FFFFFFF, bytes(buf[start:pos])))
    return frames, pos, 0


def header_fragment(flags: int, payload: bytes) -> bytes:
    """A HEADERS frame's header block fragment: its payload without padding and priority
    (ValueError when the padding does not fit the frame)."""
    pos, end = 0, len(payload)
    if flags & PADDED:
        pos, end = 1, end - (payload[0] if payload else 0)
    if flags & PRIORITY_FLAG:
        pos += 5
    if end < pos:
        raise ValueError("HEADERS padding exceeds the frame")
    return payload[pos:end]


def settings_payload(pairs: dict[int, int]) -> bytes:
    return b"".join(struct.pack(">HI", k, v) for k, v in pairs.items())


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """The (identifier, value) pairs of a SETTINGS payload (its length is a multiple of 6)."""
    return [struct.unpack_from(">HI", payload, i) for i in range(0, len(payload), 6)]


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


# ---------------------------------------------------------------------- HPACK, encoder side

TABLE_SIZE_ZERO = b"\x20"


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with ``prefix_bits`` bits in the first byte (``first`` holds the rest)."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out, value = [first | top], value - top
    while value >= 128:
        out.append(value % 128 | 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _string(s: bytes) -> bytes:
    return _int(len(s), 7, 0) + s


def literal(name: bytes, value: bytes) -> bytes:
    """A header field, literal without indexing, new name, no Huffman."""
    return b"\x00" + _string(name) + _string(value)


_STATUS_200 = b"\x88"  # :status 200, static table index 8
_CONTENT_TYPE = b"\x0f\x10" + _string(b"application/grpc")  # static name index 31
_RESPONSE_HEADERS = _STATUS_200 + _CONTENT_TYPE
_OK_TRAILERS = literal(b"grpc-status", b"0")
# Bytes of an encoded grpc-message (whole characters): a header block then fits one frame, and
# clients' metadata limits (grpcio: 8 KiB) are not reached.
MAX_STATUS_MESSAGE = 4096


def response_headers() -> bytes:
    """The header block starting a gRPC response."""
    return _RESPONSE_HEADERS


def percent_encode(message: str, limit: int | None = None) -> bytes:
    """grpc-message encoding: UTF-8, then every byte outside 0x20-0x7E and ``%`` as %XX;
    with ``limit``, only the characters whose encoding fits in ``limit`` bytes."""
    out = bytearray()
    for ch in message:
        piece = b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
                         for b in ch.encode("utf-8", "replace"))
        if limit is not None and len(out) + len(piece) > limit:
            break
        out += piece
    return bytes(out)


def _status_fields(status: int, message: str) -> bytes:
    if status == Status.OK and not message:
        return _OK_TRAILERS
    block = literal(b"grpc-status", str(int(status)).encode())
    if message:
        block += literal(b"grpc-message", percent_encode(message[:MAX_STATUS_MESSAGE],
                                                         MAX_STATUS_MESSAGE))
    return block


def trailers(status: int, message: str = "") -> bytes:
    """The trailers block ending a response that sent headers."""
    return _status_fields(status, message)


def trailers_only(status: int, message: str = "", extra: bytes = b"") -> bytes:
    """The one header block of a response without messages (``extra``: more encoded fields)."""
    return _RESPONSE_HEADERS + extra + _status_fields(status, message)


def http_status_only(code: int) -> bytes:
    """A plain HTTP response header block (for a request that is not gRPC at all)."""
    return b"\x08" + _string(str(code).encode())  # :status (static name 8), literal value


def set_nodelay(transport) -> None:
    """TCP_NODELAY on a transport's socket. asyncio sets it only for sockets it made or
    whose ``proto`` says TCP; with Nagle on, a small frame waits for the peer's delayed ACK
    (tens of milliseconds)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ---------------------------------------------------------------------- gRPC, client side

def request_headers(authority: str, path: str) -> bytes:
    """The header block of a gRPC call (literals, no encoder state)."""
    return (b"\x83\x86"  # :method POST, :scheme http (static table 3 and 6)
            + literal(b":path", path.encode()) + literal(b":authority", authority.encode())
            + literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers"))


# The status a gRPC client gives a response that is not HTTP 200, as grpc maps them.
_HTTP_TO_STATUS = {"400": Status.INTERNAL, "401": Status.UNAUTHENTICATED,
                   "403": Status.PERMISSION_DENIED, "404": Status.UNIMPLEMENTED,
                   "429": Status.UNAVAILABLE, "502": Status.UNAVAILABLE,
                   "503": Status.UNAVAILABLE, "504": Status.UNAVAILABLE}


def http_status(status: str | None) -> Status:
    """The gRPC status of a response whose ``:status`` is not 200 (others: UNKNOWN)."""
    return _HTTP_TO_STATUS.get(status, Status.UNKNOWN)


def call_status(trailers: dict) -> tuple[Status, str]:
    """A call's end from its trailers: (status, message); no valid grpc-status is UNKNOWN."""
    raw = trailers.get("grpc-status")
    if raw is None or not raw.isdigit():
        return Status.UNKNOWN, "the call ended without grpc-status"
    try:
        status = Status(int(raw))
    except ValueError:
        status = Status.UNKNOWN
    return status, unquote(trailers.get("grpc-message", ""))


def reset_status(code: int) -> Status:
    """The status of a call its server reset with RST_STREAM ``code``."""
    return Status.CANCELLED if code == H2Error.CANCEL else \
        Status.UNAVAILABLE if code == H2Error.REFUSED_STREAM else Status.INTERNAL


# ---------------------------------------------------------------------- gRPC request headers

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """Seconds of a ``grpc-timeout`` value (1-8 digits and a unit: H M S m u n)."""
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isascii() and digits.isdigit()
            and unit in _TIMEOUT_UNITS):
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(digits) * _TIMEOUT_UNITS[unit]

