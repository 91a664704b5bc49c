"""The ``ferry.v1.Worker`` gRPC service (grpc.aio) over an :class:`AsyncEngine`.

Generate, as seen from the client (see proto/ferry/v1/worker.proto for the whole protocol):

- a request the worker cannot take as sent fails the call before any chunk with
  INVALID_ARGUMENT and a message saying what to change (empty prompt, unknown token, bad
  sampling value, duplicate request id, a ``remote_prefill`` handle that does not fit the
  prompt, ...);
- ``prefill_only`` (disaggregation step 1, :mod:`workers.server.disagg`): the request stops
  after its first token; the last chunk carries ``kv_handle``, naming its pinned prompt blocks;
- ``remote_prefill`` (step 2): the handle's KV is pulled into this worker's prefix cache before
  the request starts (a failed pull means a local prefill; the request still completes);
- otherwise one chunk per engine step that produced tokens for it, the last one with
  ``finished`` and a finish reason; several steps' tokens are merged into one chunk when the
  client reads slower than the engine writes, and when they come faster than one per
  ``stream_interval_s`` (a chunk is then held back until that interval has passed since the
  previous one; the last chunk never is);
- a failure after the request was accepted (engine step error, shutdown, no KV capacity) is a
  last chunk with FINISH_REASON_ERROR and ``error`` set, never a broken or hung stream;
- the client cancelling the call aborts the request: its KV blocks are freed at once.

GenerateStream carries many such requests over one call (workers/server/generate_stream.py).

Abort ends a request on someone's behalf (its stream ends with FINISH_REASON_ABORT); Stats
reads the engine's counters and runs its integrity self-check on the engine thread, between
two steps, so the numbers are exact, and adds the KV transfer counters (imports by transport,
failed imports, the transport this worker's handles name); Info answers the fixed
configuration.
"""

from __future__ import annotations

import dataclasses
import logging

import grpc

from ferry.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvcache.manager import PrefixCacheStats
from kvcache.transfer.address import parse_transport_address
from workers.engine.engine import EngineStats, LLMEngine
from workers.engine.kv_import import ImportRefused
from workers.engine.types import EngineRequest, InvalidRequestError
from workers.server.async_engine import AsyncEngine
from workers.server.convert import (
    chunk_from_output,
    engine_request_from_proto,
    role_to_proto,
    stats_to_proto,
)
from workers.server.disagg import HandleTable, KvImporter
from workers.server.generate_stream import StreamSession

log = logging.getLogger(__name__)

PREFILL_ONLY_UNIMPLEMENTED = (
    "prefill_only is not supported by this worker yet (disaggregated prefill is not "
    "implemented); send the request without prefill_only to run it aggregated")
BOTH_DISAGG_FIELDS = (
    "a request cannot be both prefill_only and remote_prefill; send prefill_only to the "
    "prefill worker, then remote_prefill with its handle to the decode worker")
REMOTE_PREFILL_UNIMPLEMENTED = (
    "remote_prefill is not supported by this worker yet (pulling KV from a prefill worker is "
    "not implemented); send the request without remote_prefill to prefill it here")


def _engine_snapshot(engine: LLMEngine) -> tuple[EngineStats, PrefixCacheStats, str | None]:
    """Runs on the engine thread: counters plus the integrity self-check's finding."""
    detail: str | None = None
    try:
        engine.check_integrity()
    except Exception as exc:  # noqa: BLE001 - AssertionError, or worse: report it
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return engine.stats(), engine.kv.prefix_stats(), detail


def prefill_only_request(request: EngineRequest) -> EngineRequest:
    """Disaggregation step 1: stop after the first token and pin the prompt's blocks."""
    return dataclasses.replace(request, pin_prompt=True,
                               sampling=dataclasses.replace(request.sampling, max_tokens=1))


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves Generate / Abort / Stats / Info for one engine."""

    def __init__(self, aengine: AsyncEngine, worker_id: str, model: str, role: str, *,
                 stream_interval_s: float = 0.0, handles: HandleTable | None = None,
                 importer: KvImporter | None = None) -> None:
        self._aengine = aengine
        self._handles = handles  # None: prefill_only is refused
        self._importer = importer  # None: remote_prefill is refused
        self._interval = stream_interval_s
        self._sessions: set[StreamSession] = set()  # running GenerateStream calls
        self._draining = False
        self._worker_id = worker_id
        engine = aengine.engine
        cfg = engine.config
        self._info = worker_pb2.InfoResponse(
            worker_id=worker_id, model=model, role=role_to_proto(role),
            block_size=cfg.block_size, hash_seed=cfg.hash_seed, num_blocks=cfg.num_blocks,
            max_model_len=engine.max_model_len, vocab_size=engine.vocab_size)

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext):
        prefill_only, remote = request.prefill_only, request.HasField("remote_prefill")
        if prefill_only and self._handles is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, PREFILL_ONLY_UNIMPLEMENTED)
        if remote and self._importer is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, REMOTE_PREFILL_UNIMPLEMENTED)
        if prefill_only and remote:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BOTH_DISAGG_FIELDS)
        try:
            engine_request = engine_request_from_proto(request)
            if remote:
                self._importer.check(engine_request.prompt_token_ids, request.remote_prefill)
        except (InvalidRequestError, ImportRefused) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if prefill_only:
            engine_request = prefill_only_request(engine_request)
        elif remote:
            await self._importer.run(engine_request.request_id, request.remote_prefill,
                                     engine_request.prompt_token_ids)
        stream = self._aengine.generate(engine_request, self._interval)
        # The handler may be left suspended when the client goes away; this always runs.
        context.add_done_callback(lambda _ctx: stream.cancel())
        if prefill_only:  # after the abort: drop a pin whose handle never went out
            rid = engine_request.request_id
            context.add_done_callback(lambda _ctx: self._handles.forget_request(rid))
        try:
            async for out in stream:
                chunk = chunk_from_output(out)
                if out.pinned is not None:
                    if context.cancelled():
                        self._handles.release_pin(out.pinned)
                    else:
                        chunk.kv_handle.CopyFrom(self._handles.make(out.pinned))
                yield chunk
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a bug at add time: still a value in the stream
            log.exception("request %r failed before it started", request.request_id)
            yield worker_pb2.WorkerGenerateResponse(
                request_id=request.request_id, finished=True,
                finish_reason=common_pb2.FINISH_REASON_ERROR,
                num_prompt_tokens=len(request.prompt_token_ids),
                error=common_pb2.Error(code=common_pb2.ERROR_CODE_INTERNAL,
                                       message=f"{type(exc).__name__}: {exc}"))

    async def GenerateStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        session = StreamSession(self._aengine, self._interval)
        self._sessions.add(session)
        try:
            if self._draining:
                session.drain()
            await session.serve(context)
        finally:
            self._sessions.discard(session)

    def drain(self) -> None:
        """Shutting down: GenerateStream sessions refuse new requests and end once idle."""
        self._draining = True
        for session in list(self._sessions):
            session.drain()

    async def Abort(self, request: worker_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=await self._aengine.abort(request.request_id))

    async def Stats(self, request: worker_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.StatsResponse:
        try:
            stats, prefix, detail = await self._aengine.call(_engine_snapshot)
        except RuntimeError as exc:  # engine shut down
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        reply = stats_to_proto(self._worker_id, stats, prefix, detail)
        if self._importer is not None:
            reply.kv_pulls.update(self._importer.pulls_by_transport)
            reply.kv_pulls_failed = self._importer.num_failed
        if self._handles is not None and self._handles.transport_address:
            reply.kv_transport = parse_transport_address(self._handles.transport_address).scheme
        return reply

    async def Info(self, request: worker_pb2.InfoRequest,
                   context: grpc.aio.ServicerContext) -> worker_pb2.InfoResponse:
        return self._info


__all__ = ["PREFILL_ONLY_UNIMPLEMENTED", "REMOTE_PREFILL_UNIMPLEMENTED", "WorkerService"]
