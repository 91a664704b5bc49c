"""Disaggregation with each KV transport (workers/server/kv_transport.py).

Worker level (real gRPC workers in this process, tiny random Llama and mocker engines): a
prefill worker whose KV caches live in a shared-memory arena hands out ``shm://`` handles; a
decode worker copies the blocks out of the arena and decodes the aggregated greedy tokens; a
segment it cannot open (holder on another host) falls back to gRPC; a puller set to ``grpc``
never maps the arena; each import is counted under the transport that moved it (Stats);
the arena is unlinked when the worker stops; settings the caches cannot serve are refused.

``ferry serve --prefill-workers 1 --decode-workers 1 --kv-transport T`` (separate processes)
for T in grpc and shm: greedy text equals aggregated greedy text, the decode worker's stats
say T moved every import, and no /dev/shm segment of the workers outlives the deployment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import struct
import subprocess
from pathlib import Path

import grpc
import openai
import pytest

from ferry.v1 import worker_pb2, worker_pb2_grpc
from kvcache.transfer.shm import HEADER_BYTES, MAGIC, SHM_DIR
from orchestrator.worker_actor import WorkerSpec, build_engine
from tests.helpers.serve_process import ServeProcess, wait_gone
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder
from tests.integration.test_disagg_worker import PROMPT, Worker, no_blocks_in_use
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.factory import build_torch_engine
from workers.engine.model_runner import TorchModelRunner
from workers.engine.types import EngineRequest, SamplingParams
from workers.mocker.runner import MockerRunner
from workers.server.kv_transport import (
    ARENA_PREFIX,
    arena_name,
    mocker_arena,
    remove_stale_arenas,
    wants_arena,
)
from workers.server.worker import WorkerConfig, WorkerServer

pytestmark = pytest.mark.timeout(300)

BS = 4
CFG = EngineConfig(block_size=BS, num_blocks=128)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}


def run(coro, timeout: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny-transports") / "tiny-llama")


def shm_holder(folder, worker_id: str = "pre", **kw) -> tuple[Worker, Path]:
    built = build_torch_engine(str(folder), CFG, kv_arena_name=arena_name(worker_id))
    worker = Worker(built.engine, worker_id, "prefill", **kw)
    # the server owns (and unlinks) the arena from here
    worker.server = WorkerServer(built.engine, worker.server.config, kv_arena=built.kv_arena)
    return worker, built.kv_arena.path


# -- worker level -----------------------------------------------------------------------------


def test_shm_pull_equals_aggregated_and_the_arena_is_unlinked_at_stop(tiny_folder):
    async def main():
        agg = build_torch_engine(str(tiny_folder), CFG).engine
        d_eng = build_torch_engine(str(tiny_folder), CFG).engine
        p, path = shm_holder(tiny_folder)
        assert path.exists() and path.name.startswith(f"{ARENA_PREFIX}pre-{os.getpid()}-")
        async with Worker(agg, "agg", "aggregated") as a, p, Worker(d_eng, "dec", "decode") as d:
            whole, _ = await a.generate("a", PROMPT, 8)
            first, last = await p.generate("r1", PROMPT, 8, prefill_only=True)
            assert last.kv_handle.transport_address == f"shm://{path.name}@{p.address}"
            rest, dlast = await d.generate("r1", PROMPT + tuple(first), 7, handle=last.kv_handle)
            assert first + rest == whole
            assert dlast.num_cached_tokens == 20  # 5 blocks copied out of the arena
            ps, ds = await p.stats(), await d.stats()
            assert (ps.kv_transport, dict(ps.kv_pulls)) == ("shm", {})
            assert (ds.kv_transport, dict(ds.kv_pulls), ds.kv_pulls_failed) == \
                ("grpc", {"shm": 1}, 0)
            await no_blocks_in_use(p, d)  # released through gRPC
        assert not path.exists()

    run(main())


def test_an_unreachable_segment_or_a_grpc_puller_pulls_over_grpc(tiny_folder):
    async def main():
        agg = build_torch_engine(str(tiny_folder), CFG).engine
        d_auto = build_torch_engine(str(tiny_folder), CFG).engine
        d_grpc = build_torch_engine(str(tiny_folder), CFG).engine
        p, path = shm_holder(tiny_folder)
        other = tuple(reversed(PROMPT))
        async with Worker(agg, "agg", "aggregated") as a, p, \
                Worker(d_auto, "dauto", "decode") as da, \
                Worker(d_grpc, "dgrpc", "decode", kv_transport="grpc") as dg:
            whole, _ = await a.generate("a", PROMPT, 6)
            whole_other, _ = await a.generate("b", other, 6)
            first, last = await p.generate("r1", PROMPT, 6, prefill_only=True)
            rest, _ = await dg.generate("r1", PROMPT + tuple(first), 5, handle=last.kv_handle)
            assert first + rest == whole
            assert dict((await dg.stats()).kv_pulls) == {"grpc": 1}
            assert (await dg.stats()).kv_transport == "grpc"
            # the holder's segment is not on "this host" any more: gRPC from the same holder
            first2, last2 = await p.generate("r2", other, 6, prefill_only=True)
            os.unlink(path)
            rest2, dlast2 = await da.generate("r2", other + tuple(first2), 5,
                                              handle=last2.kv_handle)
            assert first2 + rest2 == whole_other and dlast2.num_cached_tokens == 20
            assert dict((await da.stats()).kv_pulls) == {"grpc": 1}
            await no_blocks_in_use(p, da, dg)

    run(main())


def test_a_mocker_holder_serves_shm_handles_of_zero_bytes():
    async def main():
        arena = mocker_arena(arena_name("mpre"), BS, CFG.num_blocks)
        p = Worker(LLMEngine(MockerRunner(384, 512), CFG), "mpre", "prefill",
                   kv_transport="shm")
        p.server = WorkerServer(p.server.engine, p.server.config, kv_arena=arena)
        async with p, Worker(LLMEngine(MockerRunner(384, 512), CFG), "mdec", "decode") as d:
            first, last = await p.generate("m", PROMPT, 4, prefill_only=True)
            assert last.kv_handle.transport_address.startswith(f"shm://{arena.name}@")
            _, dlast = await d.generate("m", PROMPT + tuple(first), 3, handle=last.kv_handle)
            assert dlast.num_cached_tokens == 20
            assert dict((await d.stats()).kv_pulls) == {"shm": 1}
            await no_blocks_in_use(p, d)
        assert not arena.path.exists()

    run(main())


def test_settings_the_caches_cannot_serve_are_refused(tiny_folder):
    with pytest.raises(ValueError, match=r"kv_transport must be one of \['auto', 'grpc', "):
        WorkerConfig(worker_id="w", model="m", kv_transport="tcp")
    assert [wants_arena(t, r) for t, r in [("auto", "prefill"), ("shm", "prefill"),
                                           ("grpc", "prefill"), ("auto", "decode"),
                                           ("shm", "aggregated")]] == \
        [True, True, False, False, False]
    with pytest.raises(ValueError, match="kv_transport"):
        wants_arena("udp", "prefill")

    async def start(engine, arena=None, **kw):
        server = WorkerServer(engine, WorkerConfig(worker_id="w", model="m", role="prefill",
                                                   **kw), kv_arena=arena)
        try:
            await server.start()
        finally:
            await server.stop(0)

    mocker = LLMEngine(MockerRunner(384, 512), CFG)
    built = build_torch_engine(str(tiny_folder), CFG)
    with pytest.raises(ValueError, match="needs a prefill worker's KV caches in a shared-memory"):
        run(start(mocker, kv_transport="shm"))
    with pytest.raises(ValueError, match="cuda-ipc' cannot be used: CUDA IPC"):
        run(start(built.engine, kv_transport="cuda-ipc"))  # caches in host memory
    stranger = mocker_arena(arena_name("w"), BS, 64)  # 64 blocks: not the engine's 128
    with pytest.raises(ValueError, match="does not hold this engine's KV caches"):
        run(start(mocker, stranger))
    assert not stranger.path.exists()  # the server owned it, also when start failed
    caches = built.engine.runner.kv_caches
    with pytest.raises(ValueError, match=r"kv_caches\[0\] is torch.float32 \(2, 512, "):
        TorchModelRunner(built.loaded.model, 64, BS, kv_caches=caches)


def test_worker_processes_build_prefill_caches_in_an_arena_unless_dev_shm_is_full(
        tiny_folder, monkeypatch):
    def spec(role: str, transport: str = "auto") -> WorkerSpec:
        return WorkerSpec(worker_id=f"{role[0]}9", model=str(tiny_folder),
                          served_model_name="m", engine=CFG, role=role, kv_transport=transport)

    engine, arena = build_engine(spec("prefill"))
    try:
        assert [c.data_ptr() for c in engine.runner.kv_caches] == \
            [c.data_ptr() for c in arena.caches]
    finally:
        arena.close()
    assert build_engine(spec("decode"))[1] is None
    assert build_engine(spec("prefill", "grpc"))[1] is None
    mocker, arena = build_engine(dataclasses.replace(spec("prefill", "shm"), runner="mocker"))
    try:
        assert (arena.layout.num_layers, arena.layout.num_blocks, arena.path.stat().st_size) == \
            (0, CFG.num_blocks, HEADER_BYTES)
        assert isinstance(mocker.runner, MockerRunner)
    finally:
        arena.close()
    full = os.statvfs_result((4096, 4096, 1, 1, 0, 1, 1, 1, 0, 255))  # no block free

    monkeypatch.setattr(os, "statvfs", lambda path: full)
    engine, arena = build_engine(spec("prefill"))  # auto: private caches, gRPC
    assert arena is None and len(engine.runner.kv_caches) == 2
    with pytest.raises(ValueError, match="/dev/shm has 0 bytes free, the KV arena needs"):
        build_engine(spec("prefill", "shm"))
    assert build_engine(dataclasses.replace(spec("prefill"), runner="mocker"))[1] is None


def test_stale_arenas_of_dead_workers_are_removed():
    probe = subprocess.Popen(["true"])  # a pid nobody has once it is reaped
    probe.wait()
    header = b'{"pid": %d, "layout": {}, "layer_stride": 0}' % probe.pid
    name = f"{ARENA_PREFIX}stale-{os.getpid()}"
    (SHM_DIR / name).write_bytes(MAGIC + struct.pack("<I", len(header)) + header)
    live = mocker_arena(arena_name("alive"), BS, 8)
    try:
        removed = remove_stale_arenas()
        assert name in removed and live.name not in removed
        assert not (SHM_DIR / name).exists() and live.path.exists()
    finally:
        live.close()
        (SHM_DIR / name).unlink(missing_ok=True)


# -- ferry serve, separate processes ----------------------------------------------------------


def worker_segments(pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{ARENA_PREFIX}*-{pid}-*"))


PROMPTS = ["the quick brown fox jumps over the lazy dog " * 3,
           "hello world, ferry moves prompts between prefill and decode workers " * 2]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_ferry_serve_disaggregated_greedy_equals_aggregated(tiny_folder, transport):
    built = build_torch_engine(str(tiny_folder), CFG)
    tok = built.loaded.tokenizer
    expected = [o.text for o in built.engine.generate([
        EngineRequest(request_id=f"ref-{i}", prompt_token_ids=tuple(tok.encode(p, True)),
                      sampling=SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(PROMPTS)])]
    serve = ServeProcess("--model", str(tiny_folder), "--prefill-workers", "1",
                         "--decode-workers", "1", "--num-blocks", "128", "--block-size", str(BS),
                         "--max-local-prefill-tokens", "0", "--kv-transport", transport,
                         env=RAY_ENV)
    pids = {w["worker_id"]: w["pid"] for w in serve.ready["workers"]}
    try:
        client = openai.OpenAI(base_url=serve.http + "/v1", api_key="unused", max_retries=0)
        got = [client.completions.create(model="tiny-llama", prompt=p, max_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
               .choices[0].text for p in PROMPTS]
        assert got == expected
        stats = {}
        for w in serve.ready["workers"]:
            with grpc.insecure_channel(w["address"]) as ch:
                stats[w["worker_id"]] = worker_pb2_grpc.WorkerStub(ch).Stats(
                    worker_pb2.StatsRequest(), timeout=10)
        assert stats["p0"].kv_transport == transport
        assert (dict(stats["d0"].kv_pulls), stats["d0"].kv_pulls_failed) == \
            ({transport: len(PROMPTS)}, 0)
        assert len(worker_segments(pids["p0"])) == (1 if transport == "shm" else 0)
        assert worker_segments(pids["d0"]) == []
        if transport == "shm":  # a prefill worker killed outright cannot unlink its arena:
            os.kill(pids["p0"], signal.SIGKILL)  # stopping ferry serve removes it
            assert wait_gone({pids["p0"]}) == set()
            assert len(worker_segments(pids["p0"])) == 1
    finally:
        assert serve.stop() == 0
    assert wait_gone(set(pids.values())) == set()
    assert [worker_segments(pid) for pid in pids.values()] == [[], []]
