"""proto/ferry/rpc at the HTTP/2 frame level, through a raw client that writes frames
by hand (tests/helpers/h2_client.py): the server's SETTINGS and HPACK use, the preface, PING,
requests cut into many DATA or CONTINUATION frames, padded and PRIORITY frames, client
trailers, header frames within the frame size, the client's GOAWAY, and connection errors
(each answered with GOAWAY and the right error code)."""

from __future__ import annotations

import json
import struct

import hpack
import pytest

from ferry.rpc import Status
from ferry.rpc import frames as fr
from ferry.rpc.connection import STREAM_WINDOW
from ferry.rpc.frames import H2Error
from tests.helpers import h2_server
from tests.helpers.h2_client import (
    RESPONSE,
    Frame,
    RawClient,
    data,
    goaway_of,
    grpc_body,
    on,
    trailers_only,
)
from tests.helpers.h2_server import FAIL, META, SLOW, UNARY, fail_request

# The fixtures of h2_server this module uses (pytest finds fixtures among a module's names).
probe_fixture, raw_fixture, server_fixture = (
    h2_server.probe_fixture, h2_server.raw_fixture, h2_server.server_fixture)

pytestmark = pytest.mark.timeout(30)


def test_server_settings_and_window(raw):
    assert raw.server_settings == {fr.MAX_CONCURRENT_STREAMS: 1024,
                                   fr.INITIAL_WINDOW_SIZE: STREAM_WINDOW, fr.ENABLE_PUSH: 0}
    raw.request(1, UNARY, b"hi")
    seen = raw.response(1)
    assert seen.messages == [b"hi"] and seen.status == 0
    assert seen.blocks == [RESPONSE, [("grpc-status", "0")]]


def test_first_header_block_sets_table_size_zero(raw):
    raw.request(1, UNARY, b"one")
    raw.request(3, FAIL, fail_request(Status.NOT_FOUND, "x"))
    first, second = raw.response(1), raw.response(3)
    assert first.raw_blocks[0][:1] == b"\x20"  # dynamic table size update to 0
    assert all(b[:1] != b"\x20" for b in first.raw_blocks[1:] + second.raw_blocks)
    assert raw.decoder.header_table.maxsize == 0
    assert hpack.Decoder().decode(first.raw_blocks[0]) == RESPONSE
    assert first.blocks == [RESPONSE, [("grpc-status", "0")]]
    assert second.blocks == [RESPONSE + [("grpc-status", "5"), ("grpc-message", "x")]]


def test_bad_preface_goaway_protocol_error(server):
    with RawClient(server.port, handshake=False) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        frames = client.rest()
    assert [f.type for f in frames] == [fr.SETTINGS, fr.WINDOW_UPDATE, fr.GOAWAY]
    last, code, debug = goaway_of(frames[-1])
    assert (last, code) == (0, H2Error.PROTOCOL_ERROR)
    assert b"preface" in debug
    # A partial preface is fine until it diverges.
    with RawClient(server.port, handshake=False) as client:
        client.send(fr.PREFACE[:10])
        client.send(fr.PREFACE[10:] + fr.frame(fr.SETTINGS, 0, 0))
        assert [(f.type, f.flags) for f in client.ping()] == [
            (fr.SETTINGS, 0), (fr.WINDOW_UPDATE, 0), (fr.SETTINGS, fr.ACK)]


def test_request_in_many_data_frames(raw):
    body = grpc_body(b"abcdefghij" * 100)
    raw.send(raw.headers(1, UNARY),
             *(fr.frame(fr.DATA, 0, 1, body[i:i + 7]) for i in range(0, len(body), 7)),
             fr.frame(fr.DATA, fr.END_STREAM, 1))
    assert raw.response(1).messages == [b"abcdefghij" * 100]


def test_continuation_split_header_block(raw):
    block = raw.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", META),
                                (":authority", "test"), ("content-type", "application/grpc"),
                                ("x-long", "v" * 3000), ("k", "v")])
    a, b = len(block) // 3, 2 * len(block) // 3
    raw.send(fr.frame(fr.HEADERS, 0, 1, block[:a]), fr.frame(fr.CONTINUATION, 0, 1, block[a:b]),
             fr.frame(fr.CONTINUATION, fr.END_HEADERS, 1, block[b:]), data(1, grpc_body(b"")))
    seen = raw.response(1)
    assert seen.status == 0
    metadata = json.loads(seen.messages[0])["metadata"]
    assert metadata == [["x-long", "v" * 3000], ["k", "v"]]
    # END_STREAM on the HEADERS frame counts when the block ends in a CONTINUATION.
    block = raw.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                ("content-type", "application/grpc")])
    raw.send(fr.frame(fr.HEADERS, fr.END_STREAM, 3, block[:4]),
             fr.frame(fr.CONTINUATION, fr.END_HEADERS, 3, block[4:]))
    assert trailers_only(raw.response(3)) == (
        Status.INTERNAL, "the call carried no request message")


def test_ping_answered_with_same_payload(raw):
    raw.send(fr.frame(fr.PING, 0, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    frames = raw.until(lambda f: f.type == fr.PING)
    assert frames[-1] == Frame(fr.PING, fr.ACK, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    raw.send(fr.frame(fr.PING, fr.ACK, 0, b"ignored!"))  # an ACK is not answered
    assert raw.ping() == []


def test_connection_window_update_zero_is_protocol_error(raw):
    raw.send(fr.window_update(0, 0))
    frames = raw.rest()
    assert len(frames) == 1
    assert goaway_of(frames[0])[:2] == (0, H2Error.PROTOCOL_ERROR)


def test_frame_over_16384_is_frame_size_error(raw):
    raw.send(raw.headers(1, UNARY), fr.frame(fr.DATA, 0, 1, bytes(16385)))
    frames = raw.rest()
    assert goaway_of(frames[-1])[:2] == (1, H2Error.FRAME_SIZE_ERROR)


def test_data_on_idle_stream_is_protocol_error(raw):
    raw.send(data(5, grpc_body(b"x")))
    frames = raw.rest()
    assert goaway_of(frames[-1])[:2] == (0, H2Error.PROTOCOL_ERROR)


def test_long_status_message_header_frame_within_max_frame_size(raw):
    details = "\u00e9" * 5000
    raw.request(1, FAIL, fail_request(Status.NOT_FOUND, details))
    frames = raw.until(lambda f: raw.streams[1].ended)
    message = raw.streams[1].message
    assert raw.streams[1].status == Status.NOT_FOUND
    assert message and details.startswith(message)
    assert max(len(f.payload) for f in frames) <= fr.DEFAULT_MAX_FRAME


def test_padded_and_priority_frames(raw):
    block = raw.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                ("content-type", "application/grpc")])
    headers = bytes([3]) + struct.pack(">IB", 0, 15) + block + b"\0\0\0"
    body = grpc_body(b"padded")
    raw.send(fr.frame(fr.HEADERS, fr.END_HEADERS | fr.PADDED | fr.PRIORITY_FLAG, 1, headers),
             fr.frame(fr.PRIORITY, 0, 1, struct.pack(">IB", 0, 7)),
             fr.frame(0x20, 0xFF, 0, b"an unknown frame type is ignored"),
             fr.frame(fr.DATA, fr.PADDED, 1, bytes([4]) + body[:3] + bytes(4)),
             fr.frame(fr.DATA, fr.PADDED | fr.END_STREAM, 1, bytes([0]) + body[3:]))
    assert raw.response(1).messages == [b"padded"]


def test_request_ended_by_client_trailers(raw):
    raw.send(raw.headers(1, UNARY), data(1, grpc_body(b"with trailers"), end_stream=False),
             fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1,
                      raw.encoder.encode([("x-trailer", "1")])))
    assert raw.response(1).messages == [b"with trailers"]


def _settings(pairs: dict[int, int], flags: int = 0) -> bytes:
    return fr.frame(fr.SETTINGS, flags, 0, fr.settings_payload(pairs))


@pytest.mark.parametrize("frames, code", [
    (fr.frame(fr.PING, 0, 0, b"1234567"), H2Error.FRAME_SIZE_ERROR),
    (fr.frame(fr.PING, 0, 1, b"12345678"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, fr.END_HEADERS, 0, b"\x88"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, fr.END_HEADERS, 2, b"\x83"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, fr.END_HEADERS, 1, b"\xff\xff\xff"), H2Error.COMPRESSION_ERROR),
    (fr.frame(fr.CONTINUATION, fr.END_HEADERS, 1, b"\x83"), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.HEADERS, 0, 1, b"\x83") + fr.frame(fr.PING, 0, 0, bytes(8)),
     H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.SETTINGS, 0, 1), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.SETTINGS, 0, 0, bytes(5)), H2Error.FRAME_SIZE_ERROR),
    (fr.frame(fr.SETTINGS, fr.ACK, 0, bytes(6)), H2Error.FRAME_SIZE_ERROR),
    (_settings({fr.INITIAL_WINDOW_SIZE: 2**31}), H2Error.FLOW_CONTROL_ERROR),
    (_settings({fr.MAX_FRAME_SIZE: 16383}), H2Error.PROTOCOL_ERROR),
    (_settings({fr.MAX_FRAME_SIZE: 2**24}), H2Error.PROTOCOL_ERROR),
    (_settings({fr.ENABLE_PUSH: 2}), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.PUSH_PROMISE, fr.END_HEADERS, 1, bytes(4)), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.RST_STREAM, 0, 0, bytes(4)), H2Error.PROTOCOL_ERROR),
    (fr.frame(fr.WINDOW_UPDATE, 0, 0, bytes(3)), H2Error.FRAME_SIZE_ERROR),
    (fr.window_update(0, 2**31 - 1), H2Error.FLOW_CONTROL_ERROR),
], ids=["ping-length", "ping-on-stream", "headers-stream-0", "headers-even-stream",
        "bad-hpack", "lone-continuation", "interrupted-block", "settings-on-stream",
        "settings-length", "settings-ack-payload", "window-too-large", "frame-size-small",
        "frame-size-large", "enable-push-2", "push-promise", "rst-stream-0",
        "window-update-length", "connection-window-overflow"])
def test_protocol_errors_end_the_connection(raw, frames, code):
    raw.send(frames)
    rest = raw.rest()
    assert [f.type for f in rest] == [fr.GOAWAY]
    assert goaway_of(rest[0])[1] == code


def test_client_goaway_closes_once_calls_end(raw, probe, server):
    raw.request(1, SLOW, b"")
    probe.wait("slow started")
    raw.send(fr.goaway(0, H2Error.NO_ERROR))
    assert on(raw.ping(), 1) == []  # the call goes on
    raw.send(fr.rst_stream(1, H2Error.CANCEL))
    assert raw.rest() == []
