"""The frontend's end of a worker's ``GenerateStream``: every request to that worker over one
long-lived gRPC stream (protocol: proto/ferry/v1/worker.proto, "Worker.GenerateStream
protocol"), because a gRPC call per request costs more CPU than the request itself.

The stream is one ``GenerateStream`` call made with ``open_call()`` (by default the stub's
grpc.aio call; :class:`~orchestrator.frontend.worker_pool.WorkerPool` passes an
:class:`ferry.rpc.client.BidiCall` on its own connection, which reads and writes
on the event loop instead of through grpc's poller thread).

:meth:`WorkerStream.generate` returns what a ``Worker.Generate`` call would (an async
iterator of ``WorkerGenerateResponse`` chunks with ``cancel()``; failures raise
``grpc.aio.AioRpcError``), so the frontend core treats both alike:

- the first request opens the stream and waits for the worker's first (empty) message. A
  worker answering UNIMPLEMENTED has no GenerateStream: that request and all later ones use
  ``Generate`` calls. Requests with ``prefill_only`` or ``remote_prefill`` always do.
- requests and cancels are queued and sent by one writer task, all that is queued in one
  message; one reader task hands each chunk to its request's :class:`StreamCall`.
- the stream failing (worker gone, connection lost) or the worker ending it (it drains) ends
  every request still on it with an ``AioRpcError`` (UNAVAILABLE when the worker ended it
  cleanly), as a broken ``Generate`` call would; the next request opens a new stream.
- cancelling a :class:`StreamCall` (``cancel()``) sends its id to cancel; its later chunks
  are dropped.
- a request whose consumer lags gets the chunks that piled up merged into one (tokens
  concatenated, the other fields from the newest), as the worker itself would have sent them:
  under load a request then costs the frontend fewer detokenizer calls and client writes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc

from ferry.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_ENDED = "the worker ended its GenerateStream (it is shutting down); retry on another worker"


def _merge(first: worker_pb2.WorkerGenerateResponse,
           rest: collections.deque) -> worker_pb2.WorkerGenerateResponse:
    """One chunk with the tokens of ``first`` and all of ``rest`` (emptied), the rest of its
    fields from the newest: what the worker sends when its reader lags (worker.proto)."""
    tokens = list(first.new_token_ids)
    last = first
    while rest:
        last = rest.popleft()
        tokens.extend(last.new_token_ids)
    merged = worker_pb2.WorkerGenerateResponse()
    merged.CopyFrom(last)
    merged.new_token_ids[:] = tokens
    return merged


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class StreamCall:
    """One request on a :class:`WorkerStream`, iterated like a ``Worker.Generate`` call."""

    __slots__ = ("_chunks", "_done", "_error", "_fallback", "_fallback_call", "_started",
                 "_stream", "_waiter", "request")

    def __init__(self, stream: WorkerStream, request: worker_pb2.WorkerGenerateRequest) -> None:
        self._stream = stream
        self.request = request
        self._chunks: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._done = False  # finished chunk received, cancelled, or failed
        self._error: BaseException | None = None
        self._started = False
        self._fallback_call = None  # a Generate call, when the worker has no GenerateStream
        self._fallback = None  # ... and its iterator

    def __aiter__(self) -> StreamCall:
        return self

    async def __anext__(self) -> worker_pb2.WorkerGenerateResponse:
        if not self._started:
            self._started = True
            if not await self._stream._start(self):
                self._fallback_call = self._stream._stub.Generate(self.request)
                self._fallback = self._fallback_call.__aiter__()
        if self._fallback is not None:
            return await self._fallback.__anext__()
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = chunks.popleft()
        if chunks:  # the reader fell behind: hand over everything there is as one chunk
            chunk = _merge(chunk, chunks)
        return chunk

    def cancel(self) -> bool:
        """End the request on the worker (nothing more is delivered); False if already over."""
        if self._fallback_call is not None:
            return self._fallback_call.cancel()
        if self._done:
            return False
        self._done = True
        self._chunks.clear()
        self._stream._cancel(self)
        self._wake()
        return True

    # ------------------------------------------------------------ from the stream

    def _push(self, chunk: worker_pb2.WorkerGenerateResponse) -> None:
        if self._done:
            return
        self._chunks.append(chunk)
        if chunk.finished:
            self._done = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class WorkerStream:
    """One worker's GenerateStream, opened on first use (see the module docstring)."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, worker_id: str = "",
                 open_call: Callable[[], Any] | None = None) -> None:
        self._stub = stub
        self._open_call = open_call or stub.GenerateStream
        self.worker_id = worker_id
        self.supported: bool | None = None  # None: not known yet
        self._call = None  # the open GenerateStream call
        self._opened: asyncio.Future | None = None  # True: open; False: unsupported
        self._calls: dict[str, StreamCall] = {}  # running requests by id
        self._send: list[worker_pb2.WorkerGenerateRequest] = []
        self._cancels: list[str] = []
        self._wake_writer: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def generate(self, request: worker_pb2.WorkerGenerateRequest):
        """Start ``request``; returns a :class:`StreamCall` (or a ``Generate`` call)."""
        if self.supported is False or request.prefill_only \
                or request.HasField("remote_prefill"):
            return self._stub.Generate(request)
        return StreamCall(self, request)

    @property
    def num_running(self) -> int:
        return len(self._calls)

    async def close(self) -> None:
        """End the stream; requests still on it fail with CANCELLED."""
        self._closed = True
        self._reset(_rpc_error(grpc.StatusCode.CANCELLED, "the frontend closed the stream"))

    # ------------------------------------------------------------ StreamCall side

    async def _start(self, sc: StreamCall) -> bool:
        """Queue ``sc`` on an open stream (True), or False: use a Generate call instead."""
        if self._closed:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "the worker was removed")
        if self.supported is False:
            return False
        if self._opened is None:
            self._open()
        opened = self._opened
        if not opened.done():
            await asyncio.shield(opened)
        if not opened.result():
            return False
        rid = sc.request.request_id
        if rid in self._calls:
            raise _rpc_error(grpc.StatusCode.INVALID_ARGUMENT,
                             f"request id {rid!r} is already running on this worker")
        if self._opened is not opened:  # the stream broke while we waited: the next one
            return await self._start(sc)
        self._calls[rid] = sc
        self._send.append(sc.request)
        self._poke()
        return True

    def _cancel(self, sc: StreamCall) -> None:
        rid = sc.request.request_id
        if self._calls.get(rid) is sc:
            del self._calls[rid]
            self._cancels.append(rid)
            self._poke()

    def _poke(self) -> None:
        wake = self._wake_writer
        if wake is not None and not wake.done():
            wake.set_result(None)

    # ------------------------------------------------------------ the call

    def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._opened = opened = loop.create_future()
        self._call = call = self._open_call()
        reader = loop.create_task(self._read(call, opened))
        writer = loop.create_task(self._write(call, opened))
        self._tasks = [reader, writer]

    async def _read(self, call, opened: asyncio.Future) -> None:
        error: BaseException
        try:
            first = await call.read()
            if first is grpc.aio.EOF:
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, _ENDED)
            self.supported = True
            opened.set_result(True)
            calls = self._calls
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    error = _rpc_error(grpc.StatusCode.UNAVAILABLE, _ENDED)
                    break
                for chunk in msg.chunks:
                    rid = chunk.request_id
                    sc = calls.get(rid)
                    if sc is not None:
                        if chunk.finished:
                            del calls[rid]
                        sc._push(chunk)
        except asyncio.CancelledError:
            return
        except grpc.aio.AioRpcError as e:
            if not opened.done() and e.code() is grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
                opened.set_result(False)
                self._reset(None)
                return
            error = e
        except Exception as e:  # a bug here: fail the requests, never hang them
            log.exception("reading worker %s's GenerateStream failed", self.worker_id)
            error = _rpc_error(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        if not opened.done():
            opened.set_exception(error)
            opened.exception()  # retrieved: waiters re-raise it
        self._reset(error)

    async def _write(self, call, opened: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        try:
            if not await opened:
                return
            while True:
                if self._send or self._cancels:
                    msg = worker_pb2.GenerateStreamRequest(requests=self._send,
                                                           cancel=self._cancels)
                    self._send, self._cancels = [], []
                    await call.write(msg)
                    continue
                self._wake_writer = wake = loop.create_future()
                try:
                    await wake
                finally:
                    self._wake_writer = None
        except asyncio.CancelledError:
            return
        except Exception:  # the call broke: the reader reports it to the requests
            log.debug("writing worker %s's GenerateStream failed", self.worker_id, exc_info=True)

    def _reset(self, error: BaseException | None) -> None:
        """Forget the current call; fail its requests with ``error``."""
        call, self._call = self._call, None
        tasks, self._tasks = self._tasks, []
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        if call is not None:
            call.cancel()
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(error or _rpc_error(grpc.StatusCode.CANCELLED, "closed"))
            with contextlib.suppress(BaseException):
                self._opened.exception()
        self._opened = None
        calls, self._calls = self._calls, {}
        self._send, self._cancels = [], []
        if error is not None:
            for sc in calls.values():
                sc._fail(error)


__all__ = ["StreamCall", "WorkerStream"]
