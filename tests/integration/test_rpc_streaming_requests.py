"""GrpcServer's request-streaming methods (ferry.rpc.call.StreamingRequests) over a raw HTTP/2
client (tests/helpers/h2_client.py): the handler starts on the call's HEADERS, RequestStream
gives each message whole and in order however DATA frames cut them (``read()`` and ``async
for``), None at the client's END_STREAM (on DATA, on HEADERS, on trailers); a client reset
cancels the handler; a truncated last message or one over the size limit ends the call."""

from __future__ import annotations

import asyncio

import pytest

from ferry.rpc import Status
from ferry.rpc import frames as fr
from ferry.rpc.call import RequestStream, ServerCall, StreamingRequests
from tests.helpers.h2_client import RawClient, data, grpc_body, trailers_only
from tests.helpers.h2_server import Probe, serving

pytestmark = pytest.mark.timeout(30)

COLLECT, ECHO = "/test.Stream/Collect", "/test.Stream/Echo"


class StreamProbe(Probe):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []
        self.methods[COLLECT] = StreamingRequests(self.collect)
        self.methods[ECHO] = StreamingRequests(self.echo)

    async def collect(self, requests: RequestStream, call: ServerCall) -> bytes:
        self.hit("collect started")
        try:
            async for m in requests:
                self.seen.append(m)
                self.hit("collect got")
        except asyncio.CancelledError:
            self.hit("collect cancelled")
            raise
        finally:
            self.hit("collect ended")
        return b"|".join(self.seen)

    async def echo(self, requests: RequestStream, call: ServerCall) -> bytes:
        while (m := await requests.read()) is not None:
            await call.write(m)
        assert await requests.read() is None  # and again after the end
        return b"done"


@pytest.fixture(name="probe")
def probe_fixture() -> StreamProbe:
    return StreamProbe()


@pytest.fixture(name="raw")
def raw_fixture(probe):
    with serving(probe) as server, RawClient(server.port) as client:
        yield client


def frame(sid: int, payload: bytes, end: bool = False) -> bytes:
    return fr.frame(fr.DATA, fr.END_STREAM if end else 0, sid, payload)


def test_handler_starts_on_headers_and_gets_messages_whole_however_cut(probe, raw):
    raw.send(raw.headers(1, COLLECT))
    probe.wait("collect started")
    body = grpc_body(b"a" * 10, b"", b"ccc")
    raw.send(frame(1, body[:3]), frame(1, body[3:12]))  # the prefix cut, then the body
    raw.ping()
    assert probe.seen == []
    raw.send(frame(1, body[12:16]))  # the first message completed, and half a prefix
    probe.wait("collect got")
    raw.send(frame(1, body[16:]), frame(1, b"", end=True))
    seen = raw.response(1)
    assert (seen.messages, seen.status) == ([b"a" * 10 + b"||ccc"], Status.OK)
    assert probe.seen == [b"a" * 10, b"", b"ccc"]


def test_read_gives_each_message_as_it_comes_then_none(raw):
    raw.send(raw.headers(1, ECHO), data(1, grpc_body(b"one"), end_stream=False))
    raw.until(lambda f: f.type == fr.DATA and f.sid == 1)
    assert raw.streams[1].messages == [b"one"]  # answered before the client ended its side
    raw.send(data(1, grpc_body(b"two", b"three")))
    seen = raw.response(1)
    assert (seen.messages, seen.status) == ([b"one", b"two", b"three", b"done"], Status.OK)


def test_end_stream_on_headers_gives_no_messages(probe, raw):
    raw.send(raw.headers(1, COLLECT, end_stream=True))
    seen = raw.response(1)
    assert (seen.messages, seen.status, probe.seen) == ([b""], Status.OK, [])


def test_trailers_end_the_request_side(probe, raw):
    raw.send(raw.headers(1, COLLECT), data(1, grpc_body(b"x"), end_stream=False),
             fr.frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1,
                      raw.encoder.encode([("x-trailer", "1")])))
    seen = raw.response(1)
    assert (seen.messages, seen.status, probe.seen) == ([b"x"], Status.OK, [b"x"])


def test_client_reset_cancels_the_handler(probe, raw):
    raw.send(raw.headers(1, COLLECT), data(1, grpc_body(b"x"), end_stream=False))
    probe.wait("collect got")
    raw.send(fr.rst_stream(1, fr.H2Error.CANCEL))
    probe.wait("collect cancelled")
    raw.request(3, ECHO, b"next")  # the connection goes on
    assert raw.response(3).messages == [b"next", b"done"]


def test_truncated_last_message_is_internal(probe, raw):
    raw.send(raw.headers(1, COLLECT),
             data(1, grpc_body(b"whole") + fr.MESSAGE_PREFIX.pack(0, 10) + b"abc"))
    assert trailers_only(raw.response(1)) == (Status.INTERNAL,
                                              "the last request message is truncated")


def test_message_over_the_limit_is_resource_exhausted(probe):
    with serving(probe, max_receive_message_length=64) as server, \
            RawClient(server.port) as raw:
        raw.send(raw.headers(1, COLLECT), data(1, grpc_body(b"x" * 100), end_stream=False))
        status, message = trailers_only(raw.response(1))
        assert status == Status.RESOURCE_EXHAUSTED and "64 bytes" in message


@pytest.mark.parametrize("case", ["truncated", "too large"])
def test_a_call_ended_by_the_server_ends_its_handler(probe, case):
    with serving(probe, max_receive_message_length=64) as server, \
            RawClient(server.port) as raw:
        message = b"x" * 100 if case == "too large" else fr.MESSAGE_PREFIX.pack(0, 10) + b"abc"
        raw.send(raw.headers(1, COLLECT))
        probe.wait("collect started")  # the handler waits in read()
        raw.send(data(1, message, end_stream=case == "truncated"))
        raw.response(1)
        probe.wait("collect cancelled", timeout=1.0)  # the server ended the call: the
        probe.wait("collect ended", timeout=1.0)  # handler is cancelled, not left waiting
