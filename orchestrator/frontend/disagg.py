"""The frontend's two-hop path in a disaggregated deployment: prefill on a prefill worker,
decode on a decode worker, one token stream to the client.

It is active while some registered worker has the role prefill or decode (``InfoResponse.
role``); a deployment of aggregated workers never enters it. The frontend core asks
:meth:`DisaggPath.open` for the worker call of each attempt; the call it gets back reads like
one ``Worker.Generate`` stream (see ``orchestrator.frontend.core``).

Protocol (F this frontend, P the prefill worker, D the decode worker; proto/ferry/v1/
worker.proto, "Disaggregation protocol"):

1. F asks the planner (:class:`~orchestrator.frontend.types.DisaggPlanner`: the router, or
   :class:`TurnPlanner` without one) for a decode worker among the ready decode workers and,
   when prefill runs remotely, a prefill worker among the ready prefill workers. The decision
   is counted in ``ferry_frontend_disagg_decisions_total{choice, reason}``.
2. Local: F sends the request to D as it is (D prefills and decodes; the aggregated path).
3. Remote: F sends P the request with ``max_tokens = 1`` and ``prefill_only``. P's last chunk
   carries the first token and a ``kv_handle``; from then on F owns the handle.
   - The request ends there (P's reason is STOP, or the caller asked for one token): F passes
     P's last chunk on and releases the handle (``KvTransfer.ReleaseHandle`` on P's address).
   - Otherwise F passes the first token on (TTFT is P's token) and sends D the request with
     the prompt plus the first token, ``max_tokens - 1`` and ``remote_prefill = handle``. D
     pulls the blocks, releases the handle itself (success or failure; a failed pull makes D
     prefill locally) and streams the tokens after the first one. F passes them on with P's
     prompt and cached-token counts (D counts the pulled tokens as cached; the caller's usage
     counts what P found in its cache). The handle is D's once D sent tokens; until then, F
     still releases it whenever the request ends (a second release is harmless: P answers
     ``released = false``).
4. P fails (an error chunk, a broken or unavailable stream, a last chunk without a handle, P
   not registered): F sends D the request as it is (local prefill) and the request completes;
   counted as ``choice="local", reason="prefill_failed"`` and told to the planner.
5. Cancel (the client went away, a stop string matched on any token): :meth:`DisaggCall.cancel`
   cancels P's call (P aborts the request: nothing pinned; a handle made meanwhile P releases
   itself) and D's call (D aborts, freeing its blocks and releasing the handle), and releases
   the handle F still owns. No block stays pinned or in use.

D failing after P's token is an error chunk like any mid-stream failure (no retry elsewhere).
Releases run as background tasks of this path; :meth:`DisaggPath.close` waits for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from prometheus_client import Counter

from ferry.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from orchestrator.frontend.types import DisaggPlan, DisaggPlanner, RouteRequest, WorkerPicker
from router.disagg import DisaggConfig, DisaggReason

if TYPE_CHECKING:
    from orchestrator.frontend.core import PreparedRequest
    from orchestrator.frontend.metrics import FrontendMetrics
    from orchestrator.frontend.worker_pool import WorkerPool

log = logging.getLogger(__name__)

_PREFILL_ROLE = common_pb2.WORKER_ROLE_PREFILL
_DISAGG_ROLES = (common_pb2.WORKER_ROLE_PREFILL, common_pb2.WORKER_ROLE_DECODE)
_STOP, _LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


def _generate(handle, request: worker_pb2.WorkerGenerateRequest):
    """Start ``request`` on a worker: over the pool's own way where it has one."""
    start = getattr(handle, "generate", None)
    return start(request) if start is not None else handle.stub.Generate(request)


class TurnPlanner:
    """The planner of a frontend without a router: the decode worker from the frontend's
    picker, prefill workers in turn, and remote prefill for prompts longer than
    ``config.max_local_prefill_tokens`` (it knows no cache, so the whole prompt counts)."""

    def __init__(self, pick_decode: WorkerPicker, config: DisaggConfig | None = None) -> None:
        self.pick_decode = pick_decode
        self.config = config or DisaggConfig()
        self._turn = 0

    def plan_disagg(self, request: RouteRequest, prefill_candidates: tuple[str, ...]
                    ) -> DisaggPlan:
        decode = self.pick_decode(request)
        if not prefill_candidates:
            return DisaggPlan(decode, None, DisaggReason.NO_PREFILL_WORKER)
        if len(request.prompt_token_ids) <= self.config.max_local_prefill_tokens:
            return DisaggPlan(decode, None, DisaggReason.SHORT_PREFILL)
        prefill = prefill_candidates[self._turn % len(prefill_candidates)]
        self._turn += 1
        return DisaggPlan(decode, prefill, DisaggReason.LONG_PREFILL)

    def decode_started(self, route_id: str) -> None:
        pass

    def prefill_failed(self, route_id: str) -> None:
        pass


class DisaggPath:
    """See the module docstring. ``planner`` None: a :class:`TurnPlanner` over the frontend's
    picker (``pick_decode``, read at each request)."""

    def __init__(self, pool: WorkerPool, metrics: FrontendMetrics, pick_decode,
                 timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.planner: DisaggPlanner | None = None
        self._pick_decode = pick_decode  # () -> the frontend's current picker
        self._turn_planner: TurnPlanner | None = None
        self.timeout_s = timeout_s
        self.decisions = Counter(
            "ferry_frontend_disagg_decisions", "Disaggregated requests by where their prompt "
            "was prefilled (choice: remote on a prefill worker, local on the decode worker) "
            "and why", ["choice", "reason"], registry=metrics.registry)
        self.handle_releases = Counter(
            "ferry_frontend_disagg_handle_releases", "KV handles this frontend released on a "
            "prefill worker (the request ended before a decode worker took the handle)",
            registry=metrics.registry)
        self._children = {r: self.decisions.labels(choice=r.choice, reason=r.value)
                          for r in DisaggReason}
        self._tasks: set[asyncio.Task] = set()
        self.active = False
        self.prefill_ids: frozenset[str] = frozenset()

    # ---------------------------------------------------------------- workers

    def refresh(self) -> None:
        """Re-read the registered workers' roles (after a worker is added or removed)."""
        handles = self.pool.handles()
        self.active = any(h.info.role in _DISAGG_ROLES for h in handles)
        self.prefill_ids = frozenset(h.worker_id for h in handles if h.info.role == _PREFILL_ROLE)

    def decode_candidates(self, ready: tuple[str, ...]) -> tuple[str, ...]:
        prefill = self.prefill_ids
        return tuple(w for w in ready if w not in prefill) if prefill else ready

    # ---------------------------------------------------------------- requests

    def open(self, prep: PreparedRequest, route: RouteRequest
             ) -> tuple[str, DisaggCall | None]:
        """Plan one attempt of ``prep`` (``route.candidates``: the ready decode workers not
        tried yet); returns the decode worker and the two-hop call, or None for the call when
        the prompt is prefilled on the decode worker (the caller sends it there as it is) or
        the planner chose a worker that is not registered."""
        planner = self.planner
        if planner is None:
            if self._turn_planner is None:
                self._turn_planner = TurnPlanner(lambda r: self._pick_decode()(r))
            planner = self._turn_planner
        prefill = tuple(w for w in self.pool.ready_ids if w in self.prefill_ids)
        plan = planner.plan_disagg(route, prefill)
        self._children[plan.reason].inc()
        if plan.prefill_worker is None or plan.decode_worker not in self.pool:
            return plan.decode_worker, None
        return plan.decode_worker, DisaggCall(self, planner, prep, route.request_id, plan)

    def release(self, prefill_worker: str, handle: worker_pb2.KvHandle) -> None:
        """Release ``handle`` on its prefill worker in the background."""
        if prefill_worker not in self.pool:  # gone: its TTL (or its death) frees the blocks
            return
        task = asyncio.get_running_loop().create_task(self._release(prefill_worker, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, prefill_worker: str, handle: worker_pb2.KvHandle) -> None:
        try:
            stub = worker_pb2_grpc.KvTransferStub(self.pool.get(prefill_worker).channel)
            await stub.ReleaseHandle(worker_pb2.ReleaseHandleRequest(handle_id=handle.handle_id),
                                     timeout=self.timeout_s)
            self.handle_releases.inc()
        except (grpc.aio.AioRpcError, KeyError) as e:  # the prefill worker's TTL covers it
            log.info("releasing KV handle %s on %s failed: %s", handle.handle_id, prefill_worker,
                     e)

    async def close(self) -> None:
        """Wait for the releases still running."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def count_fallback(self) -> None:
        self._children[DisaggReason.PREFILL_FAILED].inc()


class DisaggCall:
    """One attempt of the two-hop path, read like a ``Worker.Generate`` call: ``async for``
    gives its chunks, :meth:`cancel` ends it and frees everything (module docstring)."""

    def __init__(self, path: DisaggPath, planner: DisaggPlanner, prep: PreparedRequest,
                 route_id: str, plan: DisaggPlan) -> None:
        self._path = path
        self._planner = planner
        self._prep = prep
        self._route_id = route_id
        self.plan = plan
        self._prefill_call = None
        self._decode_call = None
        self._handle: worker_pb2.KvHandle | None = None  # owned by this frontend while set
        self._closed = False
        self._gen = self._run()

    def __aiter__(self) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        return self._gen

    def cancel(self) -> None:
        """End the request on every worker it touched and release the handle (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for call in (self._prefill_call, self._decode_call):
            if call is not None:
                call.cancel()  # nothing happens to a call already over
        self._release()

    def _release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._path.release(self.plan.prefill_worker, handle)  # type: ignore[arg-type]

    async def _run(self) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        prep = self._prep
        request = prep.worker_request
        remote = None  # P's (prompt tokens, cached tokens) once the first token came from P
        try:
            if self.plan.prefill_worker is not None:
                last = await self._prefill()
                if last is None:  # P failed: D prefills locally
                    self._path.count_fallback()
                    self._planner.prefill_failed(self._route_id)
                elif last.finish_reason == _STOP or request.sampling.max_tokens <= 1:
                    self._release()  # the request ends with the first token
                    yield last
                    return
                else:
                    token = last.new_token_ids[0]
                    remote = (last.num_prompt_tokens, last.num_cached_tokens)
                    yield worker_pb2.WorkerGenerateResponse(
                        request_id=last.request_id, new_token_ids=[token],
                        num_prompt_tokens=remote[0], num_cached_tokens=remote[1])
                    request = self._decode_request(token)
            if self._closed:
                return
            worker = self.plan.decode_worker
            if worker not in self._path.pool:  # removed while P prefilled
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(),
                                           f"decode worker {worker} left the deployment")
            self._decode_call = call = _generate(self._path.pool.get(worker), request)
            async for msg in call:
                if remote is not None:
                    if self._handle is not None and msg.new_token_ids:
                        self._handle = None  # D pulled (or gave up) and released it
                        self._planner.decode_started(self._route_id)
                    msg.num_prompt_tokens, msg.num_cached_tokens = remote
                yield msg
        finally:
            self.cancel()

    async def _prefill(self) -> worker_pb2.WorkerGenerateResponse | None:
        """Run the prefill hop; P's last chunk with its one token (the handle kept in
        ``self._handle``), or None when P failed."""
        worker = self.plan.prefill_worker
        if worker not in self._path.pool:
            return None
        request = worker_pb2.WorkerGenerateRequest()
        request.CopyFrom(self._prep.worker_request)
        request.sampling.max_tokens = 1
        request.prefill_only = True
        self._prefill_call = call = self._path.pool.get(worker).stub.Generate(request)
        tokens: list[int] = []
        try:
            async for msg in call:
                tokens.extend(msg.new_token_ids)
                if not msg.finished:
                    continue
                if msg.HasField("kv_handle"):
                    self._handle = msg.kv_handle
                if msg.finish_reason not in (_STOP, _LENGTH) or len(tokens) != 1 \
                        or self._handle is None:
                    log.info("prefill worker %s failed request %s (%s: %s); prefilling on %s",
                             worker, request.request_id,
                             common_pb2.FinishReason.Name(msg.finish_reason), msg.error.message,
                             self.plan.decode_worker)
                    self._release()
                    return None
                if len(msg.new_token_ids) != 1:
                    del msg.new_token_ids[:]
                    msg.new_token_ids.append(tokens[0])
                return msg
        except grpc.aio.AioRpcError as e:
            log.info("prefill worker %s failed request %s (%s); prefilling on %s", worker,
                     request.request_id, e.code().name, self.plan.decode_worker)
            return None
        log.info("prefill worker %s closed request %s without a last chunk; prefilling on %s",
                 worker, request.request_id, self.plan.decode_worker)
        return None

    def _decode_request(self, first_token: int) -> worker_pb2.WorkerGenerateRequest:
        request = worker_pb2.WorkerGenerateRequest()
        request.CopyFrom(self._prep.worker_request)
        request.prompt_token_ids.append(first_token)
        request.sampling.max_tokens -= 1
        request.remote_prefill.CopyFrom(self._handle)
        return request


__all__ = ["DisaggCall", "DisaggPath", "TurnPlanner"]
