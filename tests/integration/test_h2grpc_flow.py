"""proto/ferry/rpc flow control and the end of calls, seen from a raw HTTP/2 client
(tests/helpers/h2_client.py): stream and connection windows (tiny, changed by SETTINGS,
overflowing), DATA frames within the client's max frame size, write() held above the high
water mark, RST_STREAM, dropped connections and deadlines cancelling the handler, refused
streams over max_concurrent_streams."""

from __future__ import annotations

import time

import pytest

from ferry.rpc import Status
from ferry.rpc import frames as fr
from ferry.rpc.call import HIGH_WATER
from ferry.rpc.frames import H2Error
from tests.helpers import h2_server
from tests.helpers.h2_client import RESPONSE, Frame, RawClient, on, trailers_only
from tests.helpers.h2_server import RETURN_NONE, SLOW, STREAM, UNARY, item, serving, stream_request
from tests.helpers.waiting import wait_until

# The fixtures of h2_server this module uses (pytest finds fixtures among a module's names).
probe_fixture, raw_fixture, server_fixture = (
    h2_server.probe_fixture, h2_server.raw_fixture, h2_server.server_fixture)

pytestmark = pytest.mark.timeout(30)


def test_stream_window_update_zero_resets_the_stream(server, probe):
    with RawClient(server.port) as raw:
        raw.request(1, SLOW, b"")
        probe.wait("slow started")
        raw.send(fr.window_update(1, 0))
        assert raw.response(1).reset == H2Error.PROTOCOL_ERROR
        probe.wait("slow cancelled")


def test_tiny_stream_window_sends_data_as_window_updates_come(server):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 10}) as raw:
        raw.request(1, UNARY, b"m" * 100)  # 105 bytes of response DATA
        frames = raw.until(lambda f: f.type == fr.DATA)
        seen = raw.streams[1]
        assert seen.blocks == [RESPONSE] and seen.sizes == [10]
        assert on(raw.ping(), 1) == []
        raw.send(fr.window_update(1, 50))
        assert [f.type for f in on(raw.ping(), 1)] == [fr.DATA]
        assert seen.sizes == [10, 50] and not seen.ended
        raw.send(fr.window_update(1, 100))
        seen = raw.response(1)
        assert seen.sizes == [10, 50, 45]
        assert seen.messages == [b"m" * 100] and seen.status == 0
        assert frames[0].type == fr.HEADERS


def test_settings_change_of_initial_window_applies_to_open_streams(server):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, UNARY, b"w" * 30)
        raw.until(lambda f: f.type == fr.HEADERS)
        assert on(raw.ping(), 1) == []
        raw.send(fr.frame(fr.SETTINGS, 0, 0, fr.settings_payload({fr.INITIAL_WINDOW_SIZE: 20})))
        frames = raw.ping()
        assert Frame(fr.SETTINGS, fr.ACK, 0, b"") in frames
        assert raw.streams[1].sizes == [20]
        raw.send(fr.frame(fr.SETTINGS, 0, 0, fr.settings_payload({fr.INITIAL_WINDOW_SIZE: 35})))
        seen = raw.response(1)
        assert seen.sizes == [20, 15] and seen.messages == [b"w" * 30]


def test_connection_window_holds_data_back(server):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 1 << 20}) as raw:
        raw.request(1, UNARY, b"c" * 100_000)  # 100,005 bytes back; the window is 65,535
        raw.until(lambda f: f.type == fr.DATA)
        raw.ping()
        seen = raw.streams[1]
        assert sum(seen.sizes) == fr.DEFAULT_WINDOW and not seen.ended
        raw.send(fr.window_update(0, 50_000))
        seen = raw.response(1)
        assert sum(seen.sizes) == 100_005 and seen.messages == [b"c" * 100_000]
        assert max(seen.sizes) == fr.DEFAULT_MAX_FRAME


@pytest.mark.parametrize("max_frame, sizes", [
    (None, [16384] * 6 + [1701]),
    (40_000, [40_000, 40_000, 20_005]),
])
def test_data_frames_within_the_client_max_frame_size(server, max_frame, sizes):
    settings = {fr.INITIAL_WINDOW_SIZE: 1 << 20}
    if max_frame is not None:
        settings[fr.MAX_FRAME_SIZE] = max_frame
    with RawClient(server.port, settings) as raw:
        raw.send(fr.window_update(0, 1 << 20))
        raw.request(1, UNARY, b"f" * 100_000)
        seen = raw.response(1)
        assert seen.sizes == sizes
        assert seen.messages == [b"f" * 100_000]


def test_rst_stream_cancels_the_handler(raw, probe):
    raw.request(1, SLOW, b"")
    probe.wait("slow started")
    raw.send(fr.rst_stream(1, H2Error.CANCEL))
    probe.wait("slow cancelled")
    assert on(raw.ping(), 1) == []
    assert raw.streams[1].blocks == [] and not raw.streams[1].data
    raw.request(3, UNARY, b"after")
    assert raw.response(3).messages == [b"after"]


def test_server_deadline_exceeded_cancels_the_handler(raw, probe):
    start = time.monotonic()
    raw.request(1, SLOW, b"", extra=[("grpc-timeout", "100m")])
    assert trailers_only(raw.response(1)) == (Status.DEADLINE_EXCEEDED, "deadline exceeded")
    assert 0.09 < time.monotonic() - start < 3
    probe.wait("slow cancelled")


def test_deadline_before_the_request_ended(raw, probe):
    raw.send(raw.headers(1, UNARY, extra=[("grpc-timeout", "50m")]))  # no DATA yet
    seen = raw.response(1)
    assert trailers_only(seen) == (Status.DEADLINE_EXCEEDED, "deadline exceeded")
    assert on(raw.until(lambda f: f.type == fr.RST_STREAM), 1)[-1].payload == bytes(4)


def test_too_many_streams_refused(probe):
    with serving(probe, max_concurrent_streams=2) as s, RawClient(s.port) as raw:
        assert raw.server_settings[fr.MAX_CONCURRENT_STREAMS] == 2
        raw.request(1, SLOW, b"")
        raw.request(3, SLOW, b"")
        raw.request(5, SLOW, b"")
        assert raw.response(5).reset == H2Error.REFUSED_STREAM
        probe.wait("slow started", 2)
        assert raw.streams[5].blocks == []
        raw.send(fr.rst_stream(1, H2Error.CANCEL))
        probe.wait("slow cancelled")
        raw.request(7, UNARY, b"room again")
        assert raw.response(7).messages == [b"room again"]
        assert probe.counts["slow started"] == 2


def test_write_waits_above_high_water(server, probe):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, STREAM, stream_request(5000, size=100, mode=RETURN_NONE))
        # Nothing can be sent: write() returns while at most HIGH_WATER bytes are held back.
        held = HIGH_WATER // 105  # 105 bytes a framed message
        probe.wait("stream wrote", held)
        assert on(raw.ping(), 1)[0].type == fr.HEADERS
        assert probe.counts["stream wrote"] == held
        raw.send(fr.window_update(0, 1 << 20), fr.window_update(1, 1 << 20))
        seen = raw.response(1)
        assert seen.messages == [item(i, 100) for i in range(5000)] and seen.status == 0
        assert probe.counts["stream wrote"] == 5000


def test_client_reset_while_write_waits(server, probe):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, STREAM, stream_request(3, size=1 << 20))
        raw.until(lambda f: f.type == fr.HEADERS)
        raw.ping()
        assert probe.counts["stream wrote"] == 0  # the first 1 MB message is held back
        raw.send(fr.rst_stream(1, H2Error.CANCEL))
        probe.wait("stream cancelled")
        assert on(raw.ping(), 1) == []


def test_connection_drop_cancels_the_handler(server, probe):
    with RawClient(server.port) as raw:
        raw.request(1, SLOW, b"")
        probe.wait("slow started")
    probe.wait("slow cancelled")
    server.run(wait_until(lambda: not server.server.connections, 2.0, "connection gone"))


def test_stream_window_overflow_resets_the_stream(server, probe):
    with RawClient(server.port) as raw:
        raw.request(1, SLOW, b"")
        probe.wait("slow started")
        raw.send(fr.window_update(1, 2**31 - 1))
        assert raw.response(1).reset == H2Error.FLOW_CONTROL_ERROR
        probe.wait("slow cancelled")
        raw.request(3, UNARY, b"still open")
        assert raw.response(3).messages == [b"still open"]


def test_deadline_with_data_held_back_ends_the_stream(server, probe):
    with RawClient(server.port, {fr.INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, STREAM, stream_request(3, size=1 << 20),
                    extra=[("grpc-timeout", "100m")])
        probe.wait("stream cancelled")
        raw.ping()
        seen = raw.streams[1]
        assert seen.reset is not None or (seen.ended and seen.status == Status.DEADLINE_EXCEEDED)
