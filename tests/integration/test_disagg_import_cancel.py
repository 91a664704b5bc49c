"""A decode stream cancelled while the engine thread is reserving its import blocks
(``KvImporter._import``'s ``plan_import`` call, still pending) gives the reservation back
once it is made: the blocks in use return to exactly what they were without the import.

Deterministic: ``plan_import`` is held on the engine thread (a gate around the real one) until
the importing task has been cancelled, so the cancel always lands while the call is pending."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ferry.v1 import worker_pb2
from kvcache.hashing import hash_blocks
from tests.helpers.waiting import wait_until
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.kv_import import plan_import
from workers.mocker.runner import MockerRunner
from workers.server import disagg
from workers.server.async_engine import AsyncEngine
from workers.server.disagg import KvImporter

pytestmark = pytest.mark.timeout(30)

BS = 4
PROMPT = tuple(20 + (i * 37) % 300 for i in range(23))  # 5 full blocks and 3 tokens


class GatedPlan:
    """The real plan_import, entered on the engine thread and held there until ``go``."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.plans: list = []

    def __call__(self, engine: LLMEngine, block_hashes, owner: str):
        self.entered.set()
        if not self.go.wait(10.0):
            raise TimeoutError("the test never released plan_import")
        plan = plan_import(engine, block_hashes, owner)
        self.plans.append(plan)
        return plan


def in_use(engine: LLMEngine) -> tuple[int, int]:
    """Exact, on the engine thread: (blocks in use, holds); the integrity check must pass."""
    engine.check_integrity()
    return engine.kv.num_used_blocks, len(engine.kv.holds)


async def settled(aengine: AsyncEngine, expected: tuple[int, int],
                  timeout: float = 2.0) -> tuple[int, int]:
    """Poll the exact reading until it is ``expected`` (the release runs just after the plan's
    reply) or the deadline passes; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        now = await aengine.call(in_use)
        if now == expected or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.01)


def test_an_import_cancelled_while_its_blocks_are_reserved_gives_them_back(monkeypatch):
    gate = GatedPlan()
    monkeypatch.setattr(disagg, "plan_import", gate)  # what KvImporter._import calls

    async def main():
        engine = LLMEngine(MockerRunner(384, 256), EngineConfig(block_size=BS, num_blocks=32))
        aengine = AsyncEngine(engine)
        importer = KvImporter(aengine, pull_timeout_s=1.0)
        hashes = hash_blocks(list(PROMPT), engine.config.hash_config)
        # the holder does not exist: the pull is never reached
        handle = worker_pb2.KvHandle(
            handle_id="h-1", worker_id="prefill-gone", block_ids=list(range(5)),
            block_hashes=hashes, num_tokens=5 * BS, block_size=BS,
            transport_address="127.0.0.1:9")
        try:
            importer.check(PROMPT, handle)
            before = await aengine.call(in_use)
            assert before == (0, 0)

            task = asyncio.create_task(importer.run("decode-r1", handle, PROMPT))
            await wait_until(gate.entered.is_set, 5.0, "plan_import running on the engine thread")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.go.set()  # now the engine thread makes the reservation nobody waits for

            await wait_until(lambda: bool(gate.plans), 5.0, "the reservation made")
            plan = gate.plans[0]
            assert plan.hold_id is not None and (plan.skip_blocks, plan.pull_blocks) == (0, 5)
            assert await settled(aengine, before) == before  # leaked without the fix: (5, 1)
            await importer.close()
            assert await aengine.call(in_use) == before
            assert (importer.num_pulled, importer.num_failed) == (0, 0)  # no pull was tried
        finally:
            gate.go.set()
            await importer.close()
            aengine.shutdown()

    asyncio.run(asyncio.wait_for(main(), 20.0))
