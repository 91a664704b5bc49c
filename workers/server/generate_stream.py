"""The worker side of ``Worker.GenerateStream``: many requests over one long-lived stream.

A gRPC call per request costs more CPU than a whole 16-token request on a fast engine (about
half a millisecond on each side with grpc.aio), so a frontend keeps one GenerateStream per
worker and sends every request over it (protocol: proto/ferry/v1/worker.proto, "Worker.
GenerateStream protocol"). One :class:`StreamSession` serves one such call:

- reader (a task): each GenerateStreamRequest's requests are checked and submitted to the
  :class:`AsyncEngine` (``submit``: outputs come back through a callback, no task per
  request); a request refused as sent gets one finished INVALID_ARGUMENT chunk; its cancels
  abort their requests. The frontend half-closing its side means "no more requests".
- pacing as in Generate, done by the engine thread (``submit(..., min_interval_s)``): after
  a chunk, a request's next chunk is held back until ``interval_s`` has passed (what arrives
  meanwhile joins it), except the last one, which goes at once; the first is never held.
- engine outputs (callback, on the loop thread): appended to the request's pending deltas; the
  writer is woken once per batch of outputs.
- writer (the handler itself): sends every request's pending deltas as one
  GenerateStreamResponse, one chunk per request (its deltas merged), at most one message per
  ``gap_s`` (a message costs about 0.1 ms of CPU on each side: under load, what comes within
  the gap joins the message). While a write waits for the frontend to read, new outputs
  accumulate and go in the next message.
- end: when the frontend half-closed (or the worker drains, :meth:`StreamSession.drain`) and
  no request is left, the handler returns (the call ends OK). When the call ends any other
  way (cancelled, connection lost, a failure here), every request still running is aborted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from ferry.v1 import common_pb2, worker_pb2
from workers.engine.types import InvalidRequestError, RequestOutput
from workers.server.async_engine import AsyncEngine, Submission, merge_outputs
from workers.server.convert import chunk_from_output, engine_request_from_proto

log = logging.getLogger(__name__)

# At most one message per this many seconds (a message costs ~0.1 ms of CPU on each side).
MESSAGE_GAP_S = 0.001
DISAGG_ON_STREAM = ("prefill_only and remote_prefill requests are not taken on "
                    "GenerateStream; send them with Generate")
DRAINING = "the worker is shutting down; send the request to another worker"
DUPLICATE_ID = ("request id {rid!r} is already running on this stream; give every request a "
                "unique id")


def error_chunk(rid: str, num_prompt_tokens: int, code: int,
                message: str) -> worker_pb2.WorkerGenerateResponse:
    return worker_pb2.WorkerGenerateResponse(
        request_id=rid, finished=True, finish_reason=common_pb2.FINISH_REASON_ERROR,
        num_prompt_tokens=num_prompt_tokens, error=common_pb2.Error(code=code, message=message))


class _Request:
    """One request of a session: its submission and its deltas not sent yet."""

    __slots__ = ("num_prompt_tokens", "pending", "rid", "session", "sub")

    def __init__(self, session: StreamSession, rid: str, num_prompt_tokens: int) -> None:
        self.session = session
        self.rid = rid
        self.num_prompt_tokens = num_prompt_tokens
        self.sub: Submission | None = None
        self.pending: list[Any] = []  # RequestOutput deltas, or one exception

    def on_output(self, item: Any) -> None:  # loop thread, from the engine's drain
        pending = self.pending
        pending.append(item)
        if len(pending) == 1:
            self.session.ready(self)


class StreamSession:
    """Serves one GenerateStream call (see the module docstring)."""

    def __init__(self, aengine: AsyncEngine, interval_s: float = 0.0,
                 gap_s: float = MESSAGE_GAP_S) -> None:
        self._aengine = aengine
        self._interval = float(interval_s)
        self._gap = float(gap_s)
        self._requests: dict[str, _Request] = {}
        self._dirty: list[_Request] = []  # requests with pending deltas (any order)
        self._out: list[worker_pb2.WorkerGenerateResponse] = []  # refusals to send
        self._loop = asyncio.get_running_loop()
        self._wake: asyncio.Future | None = None
        self._no_more = False  # the frontend half-closed, or we drain
        self._draining = False
        self._broken = False  # reading failed: the call is over

    # ------------------------------------------------------------ the call

    async def serve(self, context: grpc.aio.ServicerContext) -> None:
        """Run the call until it ends; abort whatever is still running then."""
        context.add_done_callback(lambda _ctx: self._abort_all())
        reader = asyncio.ensure_future(self._read(context))
        try:
            await context.write(worker_pb2.GenerateStreamResponse())  # the stream is open
            await self._write(context)
        finally:
            reader.cancel()
            self._abort_all()

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE); end the call once the running ones finished."""
        self._draining = True
        self._no_more = True
        self._poke()

    # ------------------------------------------------------------ reader

    async def _read(self, context: grpc.aio.ServicerContext) -> None:
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                for request in msg.requests:
                    self._start(request)
                for rid in msg.cancel:
                    req = self._requests.pop(rid, None)
                    if req is not None and req.sub is not None:
                        req.sub.cancel()
                if self._out or msg.cancel:  # refusals to send, or maybe no request left;
                    self._poke()  # a started request wakes the writer with its first output
        except asyncio.CancelledError:
            raise
        except Exception:  # the call broke
            log.debug("GenerateStream read failed", exc_info=True)
            self._broken = True
        self._no_more = True
        self._poke()

    def _start(self, request: worker_pb2.WorkerGenerateRequest) -> None:
        rid = request.request_id
        n = len(request.prompt_token_ids)
        problem = None
        code = common_pb2.ERROR_CODE_INVALID_ARGUMENT
        if self._draining:
            problem, code = DRAINING, common_pb2.ERROR_CODE_UNAVAILABLE
        elif request.prefill_only or request.HasField("remote_prefill"):
            problem = DISAGG_ON_STREAM
        elif rid in self._requests:
            problem = DUPLICATE_ID.format(rid=rid)
        if problem is None:
            try:
                engine_request = engine_request_from_proto(request)
            except InvalidRequestError as exc:
                problem = str(exc)
        if problem is not None:
            self._out.append(error_chunk(rid, n, code, problem))
            return
        req = _Request(self, rid, n)
        self._requests[rid] = req
        req.sub = self._aengine.submit(engine_request, req.on_output, self._interval)

    # ------------------------------------------------------------ writer

    def ready(self, req: _Request) -> None:  # a request got its first pending delta
        self._dirty.append(req)
        self._poke()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _collect(self) -> list[worker_pb2.WorkerGenerateResponse]:
        """The chunks to send now: refusals, and every request's pending deltas."""
        chunks, self._out = self._out, []
        requests = self._requests
        dirty, self._dirty = self._dirty, []
        for req in dirty:
            pending = req.pending
            if not pending or requests.get(req.rid) is not req:
                continue  # cancelled meanwhile
            req.pending = []
            last = pending[-1]
            if isinstance(last, BaseException) or last.finished:
                del requests[req.rid]
            chunks.append(self._chunk(req, pending))
        return chunks

    def _chunk(self, req: _Request, pending: list[Any]) -> worker_pb2.WorkerGenerateResponse:
        last = pending[-1]
        if isinstance(last, BaseException):
            if isinstance(last, InvalidRequestError):
                return error_chunk(req.rid, req.num_prompt_tokens,
                                   common_pb2.ERROR_CODE_INVALID_ARGUMENT, str(last))
            log.error("request %r failed before it started: %r", req.rid, last)
            return error_chunk(req.rid, req.num_prompt_tokens, common_pb2.ERROR_CODE_INTERNAL,
                               f"{type(last).__name__}: {last}")
        outs: list[RequestOutput] = pending
        return chunk_from_output(merge_outputs(outs))

    async def _write(self, context: grpc.aio.ServicerContext) -> None:
        loop = self._loop
        gap = self._gap
        next_send = 0.0
        while True:
            wait = next_send - loop.time()
            if wait > 0 and (self._dirty or self._out):
                await asyncio.sleep(wait)  # what comes meanwhile joins this message
            chunks = self._collect()
            if chunks:
                next_send = loop.time() + gap
                await context.write(worker_pb2.GenerateStreamResponse(chunks=chunks))
                continue  # more may have come while writing
            if self._broken or (self._no_more and not self._requests and not self._out):
                return
            self._wake = wake = loop.create_future()
            try:
                await wake
            finally:
                self._wake = None

    def _abort_all(self) -> None:
        requests, self._requests = self._requests, {}
        for req in requests.values():
            if req.sub is not None:
                req.sub.cancel()
        self._dirty = []
        self._poke()


__all__ = ["DISAGG_ON_STREAM", "DRAINING", "DUPLICATE_ID", "StreamSession", "error_chunk"]
