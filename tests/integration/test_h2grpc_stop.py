"""proto/ferry/rpc GrpcServer arguments, start() and binding, then stop(): GOAWAY and
refused new calls at once, running calls finish within the grace, UNAVAILABLE after it, idle
connections closed, nothing left open when stop() returns. Each test owns its server
(tests/helpers/h2_server.serving)."""

from __future__ import annotations

import socket
import time

import grpc
import pytest

from ferry.rpc import GrpcServer, Status
from ferry.rpc import frames as fr
from ferry.rpc.frames import H2Error
from tests.helpers import h2_server
from tests.helpers.h2_client import RawClient, goaway_of
from tests.helpers.h2_server import (
    CHANNEL_OPTIONS,
    GATE,
    SLOW,
    UNARY,
    Probe,
    rpc_error,
    run_async,
    serving,
)
from tests.helpers.waiting import wait_until

# The fixture of h2_server this module uses (pytest finds fixtures among a module's names).
probe_fixture = h2_server.probe_fixture

pytestmark = pytest.mark.timeout(30)


def test_server_arguments_and_binding():
    with pytest.raises(ValueError, match="/package.Service/Method"):
        GrpcServer({"NoSlash": Probe().unary})
    with pytest.raises(ValueError, match="max_receive_message_length"):
        GrpcServer({}, max_receive_message_length=0)
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        GrpcServer({}, max_concurrent_streams=0)

    async def main():
        first = GrpcServer({})
        port = await first.start("127.0.0.1", 0)
        try:
            with pytest.raises(RuntimeError, match="already started"):
                await first.start("127.0.0.1", 0)
            with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
                await GrpcServer({}).start("127.0.0.1", port)
        finally:
            await first.stop()
        shared = [GrpcServer({}), GrpcServer({})]
        assert await shared[1].start("127.0.0.1", await shared[0].start(
            "127.0.0.1", 0, reuse_port=True), reuse_port=True)
        for s in shared:
            await s.stop()
    run_async(main())


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_stop_grace_lets_running_calls_finish(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        gate = ch.unary_unary(GATE)
        running = gate.future(b"grpc", timeout=10)
        raw.request(1, GATE, b"raw")
        probe.wait("gate entered", 2)
        start = time.monotonic()
        stopping = s.submit(s.stop_and_count(grace_s=5.0))
        last, code, _ = goaway_of(raw.until(lambda f: f.type == fr.GOAWAY)[-1])
        assert (last, code) == (1, H2Error.NO_ERROR)
        assert port_closed(s.port)
        raw.request(3, UNARY, b"too late")
        assert raw.response(3).reset == H2Error.REFUSED_STREAM
        e = rpc_error(ch.unary_unary(UNARY), b"too late", timeout=3)
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert not stopping.done()
        s.release()
        assert running.result(timeout=5) == b"released:grpc"
        assert raw.response(1).messages == [b"released:raw"] and raw.streams[1].status == 0
        assert raw.rest() == []  # closed once its last call ended
        remaining = stopping.result(timeout=5)
        assert time.monotonic() - start < 4.0
        assert remaining == 0


def test_stop_after_grace_ends_calls_unavailable(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        running = ch.unary_unary(SLOW).future(b"", timeout=10)
        raw.request(1, SLOW, b"")
        probe.wait("slow started", 2)
        start = time.monotonic()
        remaining = s.run(s.stop_and_count(grace_s=0.3))
        took = time.monotonic() - start
        assert 0.29 < took < 2.5
        probe.wait("slow cancelled", 2)
        e = running.exception(timeout=5)
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert e.details() == "the server is shutting down"
        seen = raw.response(1)
        assert seen.status == Status.UNAVAILABLE
        assert seen.message == "the server is shutting down"
        raw.rest()
        assert port_closed(s.port)
        assert remaining == 0


def test_stop_closes_idle_connections(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        assert ch.unary_unary(UNARY)(b"warm", timeout=5) == b"warm"
        assert s.connection_count() == 2
        start = time.monotonic()
        s.run(s.server.stop(grace_s=1.0))
        assert time.monotonic() - start < 0.5  # nothing to wait for
        frames = raw.rest()
        assert [goaway_of(f)[:2] for f in frames] == [(0, H2Error.NO_ERROR)]
        assert port_closed(s.port)
        s.run(wait_until(lambda: not s.server.connections, 2.0, "connections closed"))


def test_stop_returns_with_no_connection_left(probe):
    with serving(probe) as s, \
            grpc.insecure_channel(s.address, options=CHANNEL_OPTIONS) as ch, \
            RawClient(s.port) as raw:
        assert ch.unary_unary(UNARY)(b"warm", timeout=5) == b"warm"
        assert raw.ping() == []
        assert s.run(s.stop_and_count(grace_s=1.0)) == 0
