"""Disaggregation on a worker: the handles a prefill worker hands out, the imports a decode
worker makes (proto/ferry/v1/worker.proto, "Disaggregation protocol").

Prefill side (:class:`HandleTable`), Generate with ``prefill_only``:

- the request runs with ``max_tokens = 1`` and ``pin_prompt``: when it finishes normally the
  engine pins its full prompt blocks (``kvcache.holds``) before releasing the request's own
  references, so they can be neither evicted nor reused;
- the last chunk carries a ``KvHandle`` made here (registry of ``kvcache.transfer``): from then
  on the handle owns the pin. It ends exactly once, whichever comes first: the puller's
  ``KvTransfer.ReleaseHandle`` (served on the worker's gRPC server), the frontend's (when it
  needs no decode), the handle's TTL (checked every TTL/4), or the worker stopping. Ending it
  releases the pin on the engine's thread;
- a client gone before the last chunk leaves nothing pinned: the request is aborted, and an
  abort pins nothing. A handle made while its stream was being cancelled is released at once.

Decode side (:class:`KvImporter`), Generate with ``remote_prefill``:

1. the handle is checked against the prompt (block size; block hashes = the hashes of the
   prompt's own leading blocks): a mismatch is the caller's error (INVALID_ARGUMENT);
2. on the engine thread: blocks this worker already caches are skipped, fresh blocks are
   reserved for the rest (``workers.engine.kv_import``);
3. the KV of the rest is pulled from the holder (``kvcache.transfer.puller.pull``, by the
   handle's transport address: gRPC, shared memory or CUDA IPC, see
   workers/server/kv_transport.py; gRPC only when the importer is ``grpc_only``) straight
   into the reserved blocks, within ``pull_timeout_s``; ``pulls_by_transport`` counts the
   successful pulls by the transport that moved them (the worker's Stats report it);
4. success: the blocks enter the prefix cache (their BlockStored events go out with the next
   step); failure (holder gone, released or expired handle, timeout, corrupt chunk): the
   reservation is freed and the request prefills locally: it still completes;
5. either way the handle is released on the holder (by ``pull``, or here in the background
   when nothing was pulled; the holder's TTL covers a release that cannot get through);
6. the request is added as a plain request; its prefix lookup finds the imported blocks.

A decode stream cancelled while its blocks are being reserved or pulled frees the reservation
(once the engine thread has made it, if the cancel came first) and the handle is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass

from ferry.v1 import worker_pb2
from kvcache.holds import PinnedBlocks
from kvcache.transfer.address import parse_transport_address
from kvcache.transfer.errors import KvTransferError
from kvcache.transfer.grpc_transport import release_remote
from kvcache.transfer.handles import HandleRegistry, KvHandleInfo
from kvcache.transfer.layout import KvCacheView
from kvcache.transfer.puller import pull
from kvcache.transfer.wire import handle_from_proto, handle_to_proto
from workers.engine.engine import LLMEngine
from workers.engine.kv_import import (
    ImportPlan,
    abandon_import,
    check_handle,
    commit_import,
    plan_import,
)
from workers.server.async_engine import AsyncEngine

log = logging.getLogger(__name__)


def cache_view(engine: LLMEngine) -> KvCacheView:
    """The engine's KV cache as transfer sees it (a mocker has none: zero layers)."""
    return KvCacheView(list(getattr(engine.runner, "kv_caches", None) or []),
                       engine.config.block_size, num_blocks=engine.config.num_blocks)


class HandleTable:
    """A prefill worker's KV handles (see the module docstring)."""

    def __init__(self, aengine: AsyncEngine, worker_id: str, ttl_s: float) -> None:
        self.aengine = aengine
        self.worker_id = worker_id
        self.ttl_s = ttl_s
        self.transport_address = ""  # set by the server once bound
        self.registry = HandleRegistry(ttl_s, on_release=self._on_release)
        self._holds: dict[str, str] = {}  # handle id -> hold id on the engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expiry: asyncio.Task | None = None

    def start(self, transport_address: str) -> None:
        self.transport_address = transport_address
        self._loop = asyncio.get_running_loop()
        self._expiry = self._loop.create_task(self._expire_forever())

    def make(self, pinned: PinnedBlocks) -> worker_pb2.KvHandle:
        info = self.registry.create(
            block_ids=pinned.block_ids, block_hashes=pinned.block_hashes,
            num_tokens=pinned.num_tokens, block_size=self.aengine.engine.config.block_size,
            worker_id=self.worker_id, transport_address=self.transport_address)
        self._holds[info.handle_id] = pinned.hold_id
        return handle_to_proto(info)

    def forget_request(self, request_id: str) -> None:
        """Its Generate call ended (however): release any pin of it no handle was made for
        (a call cancelled while its last output was on its way). Runs on the engine thread
        after the call's abort, so no pin of it can appear later."""
        handed = set(self._holds.values())

        def release(engine: LLMEngine) -> None:
            for hold_id in engine.kv.holds.ids_of(request_id):
                if hold_id not in handed and hold_id not in self._holds.values():
                    engine.kv.holds.release(hold_id)

        self.aengine_call_soon(release)

    def aengine_call_soon(self, fn) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: loop.create_task(self._call_quietly(fn)))

    def release_pin(self, pinned: PinnedBlocks) -> None:
        """A pin no handle was made for (its stream is gone): release it now."""
        self._release_hold(pinned.hold_id)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
            self._expiry = None
        self.registry.release_all()

    def _on_release(self, info: KvHandleInfo) -> None:  # any thread, exactly once per handle
        hold_id = self._holds.pop(info.handle_id, None)
        if hold_id is not None:
            self._release_hold(hold_id)

    def _release_hold(self, hold_id: str) -> None:
        def release(engine: LLMEngine) -> bool:
            return engine.kv.holds.release(hold_id)

        self.aengine_call_soon(release)

    async def _call_quietly(self, fn) -> None:
        try:
            await self.aengine.call(fn)
        except RuntimeError:  # engine shut down: its blocks are gone with it
            pass

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.01, self.ttl_s / 4))
            expired = self.registry.expire()
            if expired:
                log.info("released %d KV handle(s) nobody pulled within %.1fs",
                         len(expired), self.ttl_s)


@dataclass(frozen=True)
class ImportOutcome:
    pulled_blocks: int  # blocks whose KV came from the holder
    skipped_blocks: int  # handle blocks this worker already cached
    local_reason: str | None  # why (part of) the prompt is prefilled locally; None: it is not
    no_room: bool = False  # nothing pulled: no free blocks for the pull on this worker


class KvImporter:
    """A decode worker's pulls (see the module docstring)."""

    def __init__(self, aengine: AsyncEngine, pull_timeout_s: float, *,
                 grpc_only: bool = False) -> None:
        self.aengine = aengine
        self.pull_timeout_s = pull_timeout_s
        self.grpc_only = grpc_only  # pull over gRPC whatever transport the handle names
        self.view = cache_view(aengine.engine)
        self.num_pulled = 0
        self.num_failed = 0
        self.pulls_by_transport: dict[str, int] = {}  # successful pulls, by what moved them
        self._releases: set[asyncio.Task] = set()

    def check(self, prompt_token_ids, handle: worker_pb2.KvHandle) -> None:
        """ImportRefused (a ValueError naming the fix) unless the handle fits the prompt."""
        check_handle(self.aengine.engine, prompt_token_ids, handle.block_hashes,
                     handle.num_tokens, handle.block_size)

    async def run(self, owner: str, handle: worker_pb2.KvHandle,
                  prompt_token_ids) -> ImportOutcome:
        """Import the handle's KV (``pull`` releases the handle on the holder whatever
        happens; when nothing is pulled it is released here)."""
        info = handle_from_proto(handle)
        if self.grpc_only:
            try:
                grpc_address = parse_transport_address(info.transport_address).grpc_address
            except ValueError:
                pass  # pull() reports the bad address
            else:
                info = dataclasses.replace(info, transport_address=grpc_address)
        return await self._import(owner, info, tuple(prompt_token_ids))

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)

    async def _import(self, owner: str, info: KvHandleInfo, tokens: tuple[int, ...]
                      ) -> ImportOutcome:
        hashes = tuple(info.block_hashes)
        planning = asyncio.ensure_future(
            self.aengine.call(lambda e: plan_import(e, hashes, owner)))
        try:
            plan: ImportPlan = await asyncio.shield(planning)
        except asyncio.CancelledError:
            # The engine thread reserves the blocks whether or not anyone waits: once it has,
            # give them back (the holder's TTL releases the handle).
            planning.add_done_callback(self._abandon_when_planned)
            raise
        if plan.hold_id is None:
            self._release_on_holder(info)
            reason = "no free blocks for the pull" if plan.no_room else None
            return ImportOutcome(0, plan.skip_blocks, reason, no_room=plan.no_room)
        src = tuple(info.block_ids[plan.skip_blocks:])
        try:
            result = await pull(info, self.view, plan.dest_block_ids, src_block_ids=src,
                                timeout_s=self.pull_timeout_s)
        except BaseException as exc:
            await self._abandon(plan)
            if not isinstance(exc, (KvTransferError, TimeoutError, OSError)):
                raise  # cancelled (client gone) or a bug
            self.num_failed += 1
            log.warning("pulling KV handle %s from %s failed (%s); prefilling locally",
                        info.handle_id, info.transport_address, exc)
            return ImportOutcome(0, plan.skip_blocks, f"pull failed: {exc}")
        await self.aengine.call(lambda e: commit_import(e, plan, tokens))
        self.num_pulled += 1
        self.pulls_by_transport[result.transport] = \
            self.pulls_by_transport.get(result.transport, 0) + 1
        return ImportOutcome(plan.pull_blocks, plan.skip_blocks, None)

    def _abandon_when_planned(self, planning: asyncio.Future) -> None:
        if planning.cancelled() or planning.exception() is not None:
            return
        plan = planning.result()
        if plan.hold_id is not None:
            task = asyncio.get_running_loop().create_task(self._abandon(plan))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _abandon(self, plan: ImportPlan) -> None:
        # shielded: a cancelled request must still give its reservation back
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):
            await asyncio.shield(self.aengine.call(lambda e: abandon_import(e, plan)))

    def _release_on_holder(self, info: KvHandleInfo) -> None:
        async def release() -> None:
            try:
                address = parse_transport_address(info.transport_address).grpc_address
                await release_remote(address, info.handle_id)
            except Exception as exc:  # noqa: BLE001 - the holder's TTL releases it anyway
                log.info("releasing KV handle %s on %s failed (%s); its TTL will",
                         info.handle_id, info.transport_address, exc)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


__all__ = ["HandleTable", "ImportOutcome", "KvImporter", "cache_view"]
