"""The server side of the proto/ferry/rpc tests: a GrpcServer on 127.0.0.1 (port 0) on an
event loop in a thread of its own, serving small handlers that count what they see.

- Methods (``UNARY``, ``STREAM``, ...): paths of the test service ``/test.Echo/*``. Unary
  echoes its request; Stream writes numbered messages (``stream_request`` asks for a count, a
  size and an ending: the last one returned, None returned, or ABORTED raised after them;
  ``item`` is the i-th message); Fail raises GrpcError (``fail_request``: code and details);
  Boom raises a plain exception; Slow sleeps 60 s until cancelled; Meta answers with JSON of
  its ServerCall (method, metadata, time remaining, peer); Gate waits for
  ``ServerThread.release``; WrongReturn and WrongWrite are handlers' bugs (a str for bytes).
- ``Probe``: those handlers, and a counter of what they saw ("slow started", "stream wrote",
  ...) that the test thread waits on (``probe.wait(what, n)``, with a timeout).
- ``ServerThread``: the server and its loop; ``run`` (a coroutine on that loop, waited for),
  ``submit`` (a future), ``stop_and_count`` (stop, then the connections left),
  ``connection_count``, ``close`` (stop at once, end the loop and its thread).
  ``serving(probe, **options)``: a ServerThread closed on exit.
- For grpcio clients: ``CHANNEL_OPTIONS`` (no proxy, 16 MiB messages), ``rpc_error`` (the
  RpcError a call raises), ``run_async`` (an asyncio main with a timeout).
- Fixtures, named by the test modules that use them (their names are too common for a
  conftest), as ``probe_fixture = h2_server.probe_fixture``: ``probe``, ``server`` (serving
  the probe), ``channel`` (a grpcio channel to it) and ``raw`` (a RawClient connected to it).
  A module names a fixture's dependencies too (``server`` needs ``probe``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import struct
import threading

import grpc
import pytest

from ferry.rpc import GrpcError, GrpcServer, ServerCall, Status
from tests.helpers.h2_client import RawClient

UNARY, STREAM, FAIL, BOOM, SLOW, META, GATE, WRONG_RETURN, WRONG_WRITE = (
    f"/test.Echo/{m}" for m in ("Unary", "Stream", "Fail", "Boom", "Slow", "Meta", "Gate",
                                "WrongReturn", "WrongWrite"))
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0),
                   ("grpc.max_receive_message_length", 16 << 20),
                   ("grpc.max_send_message_length", 16 << 20)]
RETURN_LAST, RETURN_NONE, RAISE_AFTER = 0, 1, 2


def item(i: int, size: int) -> bytes:
    """The i-th message of a Stream call: its number, padded to ``size`` bytes."""
    return (b"%08d" % i).ljust(size, b".")


def stream_request(count: int, size: int = 8, mode: int = RETURN_LAST) -> bytes:
    return struct.pack(">IIB", count, size, mode)


def fail_request(code: int, details: str) -> bytes:
    return bytes([code]) + details.encode()


class Probe:
    """The handlers, and what they saw: counted events the test thread waits for."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.counts: collections.Counter[str] = collections.Counter()
        self.gate = asyncio.Event()  # set on the server's loop (ServerThread.release)
        self.methods = {UNARY: self.unary, STREAM: self.stream, FAIL: self.fail,
                        BOOM: self.boom, SLOW: self.slow, META: self.meta, GATE: self.gated,
                        WRONG_RETURN: self.wrong_return, WRONG_WRITE: self.wrong_write}

    def hit(self, what: str) -> None:
        with self._cond:
            self.counts[what] += 1
            self._cond.notify_all()

    def wait(self, what: str, n: int = 1, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.counts[what] >= n, timeout):
                raise AssertionError(f"{what!r} seen {self.counts[what]} times, not {n}, "
                                     f"within {timeout}s")

    async def unary(self, request: bytes, call: ServerCall) -> bytes:
        return request

    async def stream(self, request: bytes, call: ServerCall) -> bytes | None:
        count, size, mode = struct.unpack(">IIB", request)
        try:
            for i in range(count - 1 if mode == RETURN_LAST else count):
                await call.write(item(i, size))
                self.hit("stream wrote")
        except asyncio.CancelledError:
            self.hit("stream cancelled")
            raise
        if mode == RAISE_AFTER:
            raise GrpcError(Status.ABORTED, "after the messages")
        return item(count - 1, size) if mode == RETURN_LAST else None

    async def fail(self, request: bytes, call: ServerCall) -> bytes:
        raise GrpcError(request[0], request[1:].decode())

    async def boom(self, request: bytes, call: ServerCall) -> bytes:
        raise RuntimeError("a bug in the handler")

    async def wrong_return(self, request: bytes, call: ServerCall):
        return "a str, not bytes"  # a handler's bug

    async def wrong_write(self, request: bytes, call: ServerCall):
        await call.write("a str, not bytes")  # a handler's bug
        return b"never"

    async def slow(self, request: bytes, call: ServerCall) -> bytes:
        self.hit("slow started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.hit("slow cancelled")
            raise
        return b"late"

    async def meta(self, request: bytes, call: ServerCall) -> bytes:
        return json.dumps({"method": call.method, "metadata": call.metadata,
                           "remaining": call.time_remaining(), "peer": call.peer}).encode()

    async def gated(self, request: bytes, call: ServerCall) -> bytes:
        self.hit("gate entered")
        await self.gate.wait()
        return b"released:" + request


class ServerThread:
    """A GrpcServer for ``probe``'s methods on an event loop in a thread of its own."""

    def __init__(self, probe: Probe, **options) -> None:
        self.probe = probe
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="h2grpc-test",
                                        daemon=True)
        self._thread.start()
        self.server = GrpcServer(probe.methods, **options)
        self.port = self.run(self.server.start("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.probe.gate.set)

    async def stop_and_count(self, grace_s: float) -> int:
        """stop(grace_s), then how many connections the server still holds at that moment."""
        await self.server.stop(grace_s=grace_s)
        return len(self.server.connections)

    def connection_count(self) -> int:
        async def count() -> int:
            return len(self.server.connections)
        return self.run(count())

    def close(self) -> None:
        try:
            self.run(self.server.stop(0.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            assert not self._thread.is_alive()
            self.loop.close()


@contextlib.contextmanager
def serving(probe: Probe, **options):
    server = ServerThread(probe, **options)
    try:
        yield server
    finally:
        server.close()


def run_async(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# Fixtures: ``name=`` gives their names, so that a module holding them under ``*_fixture``
# never has a test parameter that shadows one of its own names.


@pytest.fixture(name="probe")
def probe_fixture() -> Probe:
    return Probe()


@pytest.fixture(name="server")
def server_fixture(probe):
    with serving(probe) as s:
        yield s


@pytest.fixture(name="channel")
def channel_fixture(server):
    with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture(name="raw")
def raw_fixture(server):
    with RawClient(server.port) as client:
        yield client
