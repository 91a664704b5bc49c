"""What proto/ferry/rpc answers to odd gRPC requests sent over a raw HTTP/2 client
(tests/helpers/h2_client.py): wrong method or content type, zero, two or truncated request
messages, a malformed grpc-timeout, compressed requests and compression errors, and handlers
that return or write something else than bytes."""

from __future__ import annotations

import gc
import gzip
import struct
import zlib

import pytest

from ferry.rpc import Status
from ferry.rpc import frames as fr
from ferry.rpc.frames import H2Error
from tests.helpers import h2_server
from tests.helpers.h2_client import Frame, RawClient, data, grpc_body, on, trailers_only
from tests.helpers.h2_server import SLOW, UNARY, WRONG_RETURN, WRONG_WRITE, serving

# The fixtures of h2_server this module uses (pytest finds fixtures among a module's names).
probe_fixture, raw_fixture, server_fixture = (
    h2_server.probe_fixture, h2_server.raw_fixture, h2_server.server_fixture)

pytestmark = pytest.mark.timeout(30)


def test_non_post_gets_405(raw):
    raw.send(raw.headers(1, UNARY, method="GET", end_stream=True))
    seen = raw.response(1)
    assert seen.blocks == [[(":status", "405")]] and not seen.data
    assert on(raw.ping(), 1) == []  # no RST_STREAM: the client had ended its side


def test_wrong_content_type_gets_415_then_rst(raw):
    raw.send(raw.headers(1, UNARY, ctype="text/plain"))
    seen = raw.response(1)
    assert seen.blocks == [[(":status", "415")]] and not seen.data
    frames = on(raw.until(lambda f: f.type == fr.RST_STREAM), 1)
    assert frames == [Frame(fr.RST_STREAM, 0, 1, struct.pack(">I", H2Error.NO_ERROR))]
    # The client's late DATA on the answered stream is dropped, the connection goes on.
    raw.send(data(1, grpc_body(b"late")))
    raw.request(3, UNARY, b"next")
    assert raw.response(3).messages == [b"next"]


def test_content_type_with_suffix_is_grpc(raw):
    raw.request(1, UNARY, b"proto", ctype="application/grpc+proto")
    assert raw.response(1).messages == [b"proto"]


def test_two_request_messages_internal(raw):
    raw.request(1, UNARY, b"one", b"two")
    assert trailers_only(raw.response(1)) == (
        Status.INTERNAL, "this method takes exactly one request message")


def test_no_request_message_internal(raw):
    raw.send(raw.headers(1, UNARY, end_stream=True))
    assert trailers_only(raw.response(1)) == (
        Status.INTERNAL, "the call carried no request message")
    raw.send(raw.headers(3, UNARY), data(3, b""))
    assert trailers_only(raw.response(3)) == (
        Status.INTERNAL, "the call carried no request message")


def test_truncated_request_message_internal(raw):
    raw.send(raw.headers(1, UNARY), data(1, fr.MESSAGE_PREFIX.pack(0, 10) + b"12345"))
    assert trailers_only(raw.response(1)) == (Status.INTERNAL, "the request message is truncated")


def test_malformed_grpc_timeout_internal(raw, probe):
    raw.request(1, SLOW, b"", extra=[("grpc-timeout", "1.5S")])
    assert trailers_only(raw.response(1)) == (Status.INTERNAL, "malformed grpc-timeout '1.5S'")
    raw.request(3, SLOW, b"", extra=[("grpc-timeout", "123456789S")])
    assert raw.response(3).status == Status.INTERNAL
    assert probe.counts["slow started"] == 0


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_request(raw, encoding, compress):
    payload = b"squeeze " * 1000
    raw.send(raw.headers(1, UNARY, extra=[("grpc-encoding", encoding)]),
             data(1, grpc_body(compress(payload), compressed=True)))
    assert raw.response(1).messages == [payload]
    # The flag decides: an uncompressed message in a gzip call is taken as is.
    raw.request(3, UNARY, b"plain", extra=[("grpc-encoding", encoding)])
    assert raw.response(3).messages == [b"plain"]


def test_compression_errors(raw):
    raw.send(raw.headers(1, UNARY, extra=[("grpc-encoding", "snappy")]),
             data(1, grpc_body(b"x", compressed=True)))
    seen = raw.response(1)
    assert seen.status == Status.UNIMPLEMENTED
    assert seen.fields["grpc-accept-encoding"] == "identity,deflate,gzip"
    raw.send(raw.headers(3, UNARY), data(3, grpc_body(b"x", compressed=True)))
    assert trailers_only(raw.response(3)) == (
        Status.INTERNAL, "a compressed message without grpc-encoding")
    raw.send(raw.headers(5, UNARY, extra=[("grpc-encoding", "gzip")]),
             data(5, grpc_body(b"not gzip at all", compressed=True)))
    status, message = trailers_only(raw.response(5))
    assert status == Status.INTERNAL and message.startswith("cannot decompress the request")


def test_truncated_gzip_request_is_an_error(raw):
    compressed = gzip.compress(b"0123456789" * 1000)
    raw.send(raw.headers(1, UNARY, extra=[("grpc-encoding", "gzip")]),
             data(1, grpc_body(compressed[:len(compressed) // 2], compressed=True)))
    assert raw.response(1).status == Status.INTERNAL


def test_handler_returning_not_bytes_is_unknown(probe):
    # A raw client, not grpcio: it sends no RST_STREAM at its deadline, so the dead task is
    # only dropped when its server stops, before this thread formats the failure (Python
    # 3.11's traceback formatting calls ast.parse, which is not thread-safe: "SystemError: AST
    # constructor recursion depth mismatch" when both threads format a traceback at once).
    try:
        with serving(probe) as s, RawClient(s.port) as raw:
            raw.request(1, WRONG_RETURN, b"")
            raw.sock.settimeout(1.0)
            seen = raw.response(1)
    finally:
        gc.collect()  # the task's "exception was never retrieved" is logged within this test
    assert (seen.status, seen.data) == (Status.UNKNOWN, b"")


def test_write_of_not_bytes_sends_no_partial_message(raw):
    raw.request(1, WRONG_WRITE, b"")
    seen = raw.response(1)
    assert seen.status == Status.UNKNOWN
    assert seen.data == b""
