"""A raw HTTP/2 gRPC client for the proto/ferry/rpc tests: frames written by hand over a
blocking socket, for what grpc clients never do (bad prefaces, odd requests, tiny windows,
resets, too many streams, protocol errors).

- ``RawClient``: one connection to 127.0.0.1. It sends the preface and its SETTINGS, reads the
  server's SETTINGS until the ACK of its own, and ACKs them (``handshake=False`` skips all of
  that). ``send`` writes bytes as given; ``headers`` and ``request`` build a call's HEADERS
  (and its messages as DATA); ``read`` returns the next frame and notes what it says about
  its stream in ``streams``; ``until``, ``rest``, ``ping`` and ``response`` read up to a point
  (a predicate, the server closing, a PING round trip, a stream's end). Every read has a
  timeout: no test hangs.
- ``Frame``: one frame as read. ``Seen``: what one stream received (decoded header blocks,
  the raw blocks, DATA bytes and frame sizes, END_STREAM, RST_STREAM code), with the gRPC
  view of it (trailer fields, status, message, the length-prefixed messages).
- ``grpc_body`` frames messages with the 5-byte gRPC prefix; ``data`` cuts a body into DATA
  frames of 16 KiB, END_STREAM on the last.
- ``on`` keeps the frames of one stream; ``goaway_of`` reads a GOAWAY (last stream, code,
  debug data); ``trailers_only`` checks a trailers-only response and gives its status and
  message. ``RESPONSE`` is the header block a gRPC response starts with.
"""

from __future__ import annotations

import collections
import socket
import struct
import urllib.parse
from dataclasses import dataclass, field
from typing import NamedTuple, Self

import hpack

from ferry.rpc import frames as fr

RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]


class Frame(NamedTuple):
    type: int
    flags: int
    sid: int
    payload: bytes


@dataclass
class Seen:
    """What one stream received."""

    blocks: list[list[tuple[str, str]]] = field(default_factory=list)
    raw_blocks: list[bytes] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    sizes: list[int] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    @property
    def fields(self) -> dict[str, str]:
        return dict(self.blocks[-1])

    @property
    def status(self) -> int:
        return int(self.fields["grpc-status"])

    @property
    def message(self) -> str:
        return urllib.parse.unquote(self.fields.get("grpc-message", ""), errors="strict")

    @property
    def messages(self) -> list[bytes]:
        out, pos = [], 0
        while pos < len(self.data):
            flag, n = fr.MESSAGE_PREFIX.unpack_from(self.data, pos)
            assert flag == 0
            out.append(bytes(self.data[pos + 5:pos + 5 + n]))
            pos += 5 + n
        assert pos == len(self.data)
        return out


def grpc_body(*messages: bytes, compressed: bool = False) -> bytes:
    return b"".join(fr.MESSAGE_PREFIX.pack(int(compressed), len(m)) + m for m in messages)


def data(sid: int, body: bytes, end_stream: bool = True) -> bytes:
    chunks = [body[i:i + fr.DEFAULT_MAX_FRAME]
              for i in range(0, len(body), fr.DEFAULT_MAX_FRAME)] or [b""]
    return b"".join(fr.frame(fr.DATA, fr.END_STREAM if end_stream and i == len(chunks) - 1
                             else 0, sid, c) for i, c in enumerate(chunks))


class RawClient:
    """HTTP/2 by hand over a blocking socket; every read has a timeout (no test hangs)."""

    def __init__(self, port: int, settings: dict[int, int] | None = None,
                 handshake: bool = True, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = bytearray()
        self.streams: dict[int, Seen] = collections.defaultdict(Seen)
        self.server_settings: dict[int, int] = {}
        self._block: tuple[int, int, bytearray] | None = None
        self._pings = 0
        if handshake:
            self.send(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0,
                                            fr.settings_payload(settings or {})))
            # The server's SETTINGS and WINDOW_UPDATE, then its ACK of ours.
            self.until(lambda f: f.type == fr.SETTINGS and f.flags & fr.ACK)
            self.send(fr.frame(fr.SETTINGS, fr.ACK, 0))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def read(self) -> Frame | None:
        """The next frame (None: the server closed the connection)."""
        while True:
            if len(self.buf) >= 9:
                length_type, flags, sid = fr.FRAME_HEADER.unpack_from(self.buf)
                length = length_type >> 8
                if len(self.buf) >= 9 + length:
                    f = Frame(length_type & 0xFF, flags, sid & 0x7FFFFFFF,
                              bytes(self.buf[9:9 + length]))
                    del self.buf[:9 + length]
                    self._note(f)
                    return f
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                assert not self.buf, f"the connection closed inside a frame: {bytes(self.buf)!r}"
                return None
            self.buf += chunk

    def _note(self, f: Frame) -> None:
        seen = self.streams[f.sid] if f.sid else None
        if f.type == fr.SETTINGS and not f.flags & fr.ACK:
            self.server_settings.update(fr.parse_settings(f.payload))
        elif f.type == fr.DATA:
            seen.data += f.payload
            seen.sizes.append(len(f.payload))
            seen.ended = bool(f.flags & fr.END_STREAM)
        elif f.type == fr.HEADERS:
            assert self._block is None
            self._block = (f.sid, f.flags, bytearray(f.payload))
        elif f.type == fr.CONTINUATION:
            assert self._block is not None and self._block[0] == f.sid
            self._block[2].extend(f.payload)
        elif f.type == fr.RST_STREAM:
            seen.reset = int.from_bytes(f.payload, "big")
        if f.type in (fr.HEADERS, fr.CONTINUATION) and f.flags & fr.END_HEADERS:
            _, first_flags, block = self._block
            self._block = None
            seen.raw_blocks.append(bytes(block))
            seen.blocks.append([(n, v) for n, v in self.decoder.decode(bytes(block))])
            seen.ended = bool(first_flags & fr.END_STREAM)

    def until(self, predicate) -> list[Frame]:
        """Frames read up to and including the first one for which ``predicate`` is true."""
        frames = []
        while True:
            f = self.read()
            assert f is not None, f"the server closed the connection; frames read: {frames}"
            frames.append(f)
            if predicate(f):
                return frames

    def rest(self) -> list[Frame]:
        """Every frame up to the server closing the connection."""
        frames = []
        while (f := self.read()) is not None:
            frames.append(f)
        return frames

    def ping(self) -> list[Frame]:
        """A PING round trip: the frames the server sent before its ACK (all it had to say
        about what it received before the PING, when nothing runs meanwhile)."""
        self._pings += 1
        payload = b"sync%04d" % self._pings
        self.send(fr.frame(fr.PING, 0, 0, payload))
        frames = self.until(lambda f: f.type == fr.PING and f.payload == payload)
        assert frames[-1].flags == fr.ACK
        return frames[:-1]

    def response(self, sid: int) -> Seen:
        """Read until stream ``sid`` ended or was reset."""
        seen = self.streams[sid]
        if not (seen.ended or seen.reset is not None):
            self.until(lambda f: seen.ended or seen.reset is not None)
        return seen

    def headers(self, sid: int, path: str, *, method: str = "POST",
                ctype: str = "application/grpc", extra=(), end_stream: bool = False) -> bytes:
        block = self.encoder.encode([(":method", method), (":scheme", "http"), (":path", path),
                                     (":authority", "test"), ("content-type", ctype),
                                     ("te", "trailers"), *extra])
        flags = fr.END_HEADERS | (fr.END_STREAM if end_stream else 0)
        return fr.frame(fr.HEADERS, flags, sid, block)

    def request(self, sid: int, path: str, *messages: bytes, **headers) -> None:
        """One call: HEADERS, then its messages as DATA (16 KiB frames) with END_STREAM."""
        self.send(self.headers(sid, path, **headers), data(sid, grpc_body(*messages)))


def on(frames: list[Frame], sid: int) -> list[Frame]:
    return [f for f in frames if f.sid == sid]


def goaway_of(f: Frame) -> tuple[int, int, bytes]:
    assert f.type == fr.GOAWAY and f.sid == 0
    last, code = struct.unpack_from(">II", f.payload)
    return last, code, f.payload[8:]


def trailers_only(seen: Seen) -> tuple[int, str]:
    assert len(seen.blocks) == 1 and seen.blocks[0][:2] == RESPONSE and not seen.data
    return seen.status, seen.message
