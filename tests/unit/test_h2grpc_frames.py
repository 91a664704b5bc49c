"""The pure functions of proto/ferry/rpc/frames.py: frame bytes, SETTINGS payloads,
grpc-timeout values, grpc-message percent-encoding, and the HPACK header blocks the server
sends, decoded with the reference decoder (``hpack.Decoder``)."""

from __future__ import annotations

import urllib.parse

import hpack
import pytest

from ferry.rpc import frames as fr
from ferry.rpc.frames import H2Error, Status

RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]


def _decode(block: bytes) -> list[tuple[str, str]]:
    decoder = hpack.Decoder(max_header_list_size=1 << 20)
    headers = [(name, value) for name, value in decoder.decode(block)]
    assert len(decoder.header_table.dynamic_entries) == 0, "the server's blocks never index"
    return headers


# ---------------------------------------------------------------------- frames


def test_frame_header_bytes():
    assert fr.frame(fr.DATA, fr.END_STREAM, 3, b"abc") == (
        b"\x00\x00\x03" b"\x00" b"\x01" b"\x00\x00\x00\x03" b"abc")
    assert fr.frame(fr.SETTINGS, fr.ACK, 0) == b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
    assert fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 2**31 - 1, b"x") == (
        b"\x00\x00\x01\x01\x05\x7f\xff\xff\xffx")
    big = fr.frame(fr.DATA, 0, 1, bytes(fr.MAX_FRAME_LIMIT))
    assert big[:9] == b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"
    assert len(big) == 9 + fr.MAX_FRAME_LIMIT


def test_frame_header_unpacks_to_what_was_packed():
    data = fr.frame(fr.CONTINUATION, fr.END_HEADERS, 7, bytes(16384))
    length_type, flags, sid = fr.FRAME_HEADER.unpack_from(data)
    assert (length_type >> 8, length_type & 0xFF, flags, sid) == (16384, 9, 4, 7)


def test_control_frames():
    assert fr.rst_stream(5, H2Error.REFUSED_STREAM) == (
        b"\x00\x00\x04\x03\x00\x00\x00\x00\x05" b"\x00\x00\x00\x07")
    assert fr.goaway(9, H2Error.PROTOCOL_ERROR, b"why") == (
        b"\x00\x00\x0b\x07\x00\x00\x00\x00\x00" b"\x00\x00\x00\x09" b"\x00\x00\x00\x01" b"why")
    assert fr.window_update(0, 2**31 - 1) == (
        b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" b"\x7f\xff\xff\xff")


def test_parse_settings():
    payload = b"\x00\x04\x00\x00\x00\x0a" b"\x00\x05\x00\x00\x40\x00" b"\x00\x03\xff\xff\xff\xff"
    assert fr.parse_settings(payload) == [(fr.INITIAL_WINDOW_SIZE, 10),
                                          (fr.MAX_FRAME_SIZE, 16384),
                                          (fr.MAX_CONCURRENT_STREAMS, 2**32 - 1)]
    assert fr.parse_settings(b"") == []
    pairs = {fr.HEADER_TABLE_SIZE: 0, fr.ENABLE_PUSH: 0, fr.MAX_HEADER_LIST_SIZE: 8192}
    assert fr.settings_payload(pairs) == (b"\x00\x01\x00\x00\x00\x00" b"\x00\x02\x00\x00\x00\x00"
                                          b"\x00\x06\x00\x00\x20\x00")
    assert fr.parse_settings(fr.settings_payload(pairs)) == list(pairs.items())


# ---------------------------------------------------------------------- grpc-timeout


@pytest.mark.parametrize("value, seconds", [
    ("1H", 3600.0), ("2M", 120.0), ("30S", 30.0), ("100m", 0.1), ("250u", 250e-6),
    ("7n", 7e-9), ("0S", 0.0), ("00000001S", 1.0), ("99999999H", 99999999 * 3600.0),
    ("12345678m", 12345.678),
])
def test_parse_timeout_units(value, seconds):
    assert fr.parse_timeout(value) == pytest.approx(seconds, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("value", [
    "123456789S",  # 9 digits
    "100",         # no unit
    "5s",          # unknown unit (lower-case s is not seconds)
    "5x",
    "",
    "S",           # no digits
    "1.5S",
    "-1S",
    "+1S",
    " 1S",
    "1 S",
    "\uff11S",     # a non-ASCII digit
    "\u00b2S",     # isdigit() but not a decimal digit
])
def test_parse_timeout_rejects(value):
    with pytest.raises(ValueError, match="malformed grpc-timeout"):
        fr.parse_timeout(value)


# ---------------------------------------------------------------------- grpc-message


def test_percent_encode_keeps_printable_ascii_but_percent():
    printable = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)
    assert fr.percent_encode(printable) == printable.encode()
    assert fr.percent_encode("") == b""


@pytest.mark.parametrize("message, encoded", [
    ("%", b"%25"),
    ("100%", b"100%25"),
    ("%25", b"%2525"),
    ("\x00\t\n\r\x1f\x7f", b"%00%09%0A%0D%1F%7F"),
    ("\u00e9", b"%C3%A9"),
    ("n\u00f6 \u2713", b"n%C3%B6 %E2%9C%93"),
    ("\U0001F600", b"%F0%9F%98%80"),
    ("\ud800", b"?"),  # a lone surrogate is not UTF-8: replaced
])
def test_percent_encode_escapes(message, encoded):
    assert fr.percent_encode(message) == encoded


def test_percent_encode_round_trips_with_a_standard_decoder():
    message = "caf\u00e9 100% \u2713\n\U0001F600 tab\there"
    encoded = fr.percent_encode(message)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert urllib.parse.unquote(encoded.decode("ascii"), errors="strict") == message


# ---------------------------------------------------------------------- header blocks


def test_response_headers():
    assert _decode(fr.response_headers()) == RESPONSE


def test_first_block_with_table_size_zero_decodes():
    decoder = hpack.Decoder()
    assert decoder.decode(fr.TABLE_SIZE_ZERO + fr.response_headers()) == RESPONSE
    assert decoder.header_table.maxsize == 0


def test_trailers_ok():
    assert _decode(fr.trailers(Status.OK)) == [("grpc-status", "0")]
    assert _decode(fr.trailers(Status.OK, "fine")) == [("grpc-status", "0"),
                                                       ("grpc-message", "fine")]


def test_trailers_with_status_and_message():
    assert _decode(fr.trailers(Status.NOT_FOUND, "n\u00f6 100%")) == [
        ("grpc-status", "5"), ("grpc-message", "n%C3%B6 100%25")]
    assert _decode(fr.trailers(Status.UNAUTHENTICATED)) == [("grpc-status", "16")]
    assert _decode(fr.trailers(13, "x")) == [("grpc-status", "13"), ("grpc-message", "x")]


def test_trailers_only():
    assert _decode(fr.trailers_only(Status.OK)) == RESPONSE + [("grpc-status", "0")]
    assert _decode(fr.trailers_only(Status.UNIMPLEMENTED, "unknown method /a.B/C")) == (
        RESPONSE + [("grpc-status", "12"), ("grpc-message", "unknown method /a.B/C")])
    extra = fr.literal(b"grpc-accept-encoding", b"identity,gzip")
    assert _decode(fr.trailers_only(Status.UNIMPLEMENTED, "no", extra)) == RESPONSE + [
        ("grpc-accept-encoding", "identity,gzip"), ("grpc-status", "12"),
        ("grpc-message", "no")]


@pytest.mark.parametrize("build", [fr.trailers, fr.trailers_only])
def test_status_message_cut_at_max_bytes_on_a_character(build):
    n = fr.MAX_STATUS_MESSAGE
    assert n == 4096
    fields = _decode(build(Status.INTERNAL, "a" * (n + 1000)))
    assert fields[-1] == ("grpc-message", "a" * n)
    fields = _decode(build(Status.INTERNAL, "\u00e9" * (n + 1)))
    assert fields[-1] == ("grpc-message", "%C3%A9" * (n // 6))
    fields = _decode(build(Status.INTERNAL, "b" * n))
    assert fields[-1] == ("grpc-message", "b" * n)
    fields = _decode(build(Status.INTERNAL, "b" * (n - 3) + "%\u00e9"))
    assert fields[-1] == ("grpc-message", "b" * (n - 3) + "%25")
    fields = _decode(build(Status.INTERNAL, "b" * (n - 2) + "%\u00e9"))
    assert fields[-1] == ("grpc-message", "b" * (n - 2))


@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 254, 255, 256, 16383, 16384, 70000])
def test_literal_lengths_at_integer_boundaries(length):
    value = bytes(ord("a") + i % 26 for i in range(length))
    assert _decode(fr.literal(b"x-name", value)) == [("x-name", value.decode())]
    name = b"n" * length if length else b"n"
    assert _decode(fr.literal(name, b"v")) == [(name.decode(), "v")]


@pytest.mark.parametrize("code", [405, 415, 200, 404])
def test_http_status_only(code):
    assert _decode(fr.http_status_only(code)) == [(":status", str(code))]


def test_request_headers_decode_to_a_grpc_call():
    assert _decode(fr.request_headers("127.0.0.1:5", "/a.S/M")) == [
        (":method", "POST"), (":scheme", "http"), (":path", "/a.S/M"),
        (":authority", "127.0.0.1:5"), ("content-type", "application/grpc"), ("te", "trailers")]


def test_header_fragment_strips_padding_and_priority_and_refuses_bad_padding():
    block = b"\x83\x86"
    assert fr.header_fragment(0, block) == block
    assert fr.header_fragment(fr.PADDED, bytes([3]) + block + b"\0\0\0") == block
    assert fr.header_fragment(fr.PRIORITY_FLAG, b"\0" * 5 + block) == block
    assert fr.header_fragment(fr.PADDED | fr.PRIORITY_FLAG,
                              bytes([1]) + b"\0" * 5 + block + b"\0") == block
    with pytest.raises(ValueError, match="padding exceeds"):
        fr.header_fragment(fr.PADDED, bytes([9]) + block)


@pytest.mark.parametrize("status,want", [
    ("404", Status.UNIMPLEMENTED), ("503", Status.UNAVAILABLE), ("429", Status.UNAVAILABLE),
    ("401", Status.UNAUTHENTICATED), ("403", Status.PERMISSION_DENIED),
    ("400", Status.INTERNAL), ("500", Status.UNKNOWN), (None, Status.UNKNOWN)])
def test_http_status_as_grpc_maps_it(status, want):
    assert fr.http_status(status) is want


@pytest.mark.parametrize("trailers,want", [
    ({"grpc-status": "0"}, (Status.OK, "")),
    ({"grpc-status": "5", "grpc-message": "no %C3%A9 100%25"}, (Status.NOT_FOUND, "no é 100%")),
    ({"grpc-status": "99"}, (Status.UNKNOWN, "")),
    ({"grpc-status": "x"}, (Status.UNKNOWN, "the call ended without grpc-status")),
    ({}, (Status.UNKNOWN, "the call ended without grpc-status"))])
def test_call_status_from_trailers(trailers, want):
    assert fr.call_status(trailers) == want


def test_reset_status():
    assert [fr.reset_status(c) for c in (fr.H2Error.CANCEL, fr.H2Error.REFUSED_STREAM,
                                         fr.H2Error.INTERNAL_ERROR, 0)] == \
        [Status.CANCELLED, Status.UNAVAILABLE, Status.INTERNAL, Status.INTERNAL]
