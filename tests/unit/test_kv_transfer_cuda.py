"""CUDA-IPC transport. Without CUDA: every entry point says clearly that it is not available.
With CUDA (a lent GPU machine): export in one process, device-to-device pull in another, bit for
bit; and a pull inside the exporting process."""

from __future__ import annotations

import multiprocessing
import os
import uuid

import pytest
import torch

from kvcache.transfer import cuda_ipc
from kvcache.transfer.cuda_ipc import (
    CudaIpcExport,
    CudaIpcUnavailable,
    cuda_ipc_unavailable_reason,
    pull_cuda_ipc,
)
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvCacheView
from kvcache.transfer.shm import SHM_DIR

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA errors")


@pytest.fixture
def name():
    value = f"ferry-test-ipc-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield value
    cuda_ipc.forget_opened()
    left = sorted(p.name for p in SHM_DIR.glob(f"{value}*"))
    for p in left:
        os.unlink(SHM_DIR / p)
    assert left == [], f"export files left in /dev/shm: {left}"


def handle(address, block_ids, block_size=4):
    return KvHandleInfo("h", "p", tuple(block_ids), tuple(range(len(block_ids))),
                        len(block_ids) * block_size, block_size, address)


def test_cpu_caches_cannot_be_exported(name):
    caches = [torch.zeros(2, 16, 2, 4) for _ in range(2)]
    with pytest.raises(CudaIpcUnavailable, match="shm:// or gRPC transport") as info:
        CudaIpcExport.create(name, caches, 4)
    assert info.value.code == "UNAVAILABLE"
    assert not (SHM_DIR / name).exists()


@cpu_only
def test_without_cuda_the_reason_names_it_and_pulls_fail_cleanly(name):
    reason = cuda_ipc_unavailable_reason()
    assert reason is not None and "torch.cuda is not available" in reason
    dest = KvCacheView([torch.zeros(2, 16, 2, 4) for _ in range(2)], 4)
    h = handle(f"cuda-ipc://{name}@127.0.0.1:7001", [0, 1])
    with pytest.raises(CudaIpcUnavailable, match="CUDA"):
        pull_cuda_ipc(h, dest, [2, 3])


def test_a_missing_export_is_unavailable_and_other_schemes_are_refused(name):
    dest = KvCacheView([], 4, num_blocks=4)
    with pytest.raises(CudaIpcUnavailable, match="no CUDA-IPC export"):
        pull_cuda_ipc(handle(f"cuda-ipc://{name}@127.0.0.1:7001", [0]), dest, [1])
    with pytest.raises(ValueError, match="not a CUDA-IPC address"):
        pull_cuda_ipc(handle("127.0.0.1:7001", [0]), dest, [1])


def test_zero_layer_export_works_without_a_gpu(name):
    """A mocker has no KV data: exporting and pulling it in-process moves zero bytes."""
    with CudaIpcExport.create(name, [], 4, num_blocks=8) as export:
        assert (SHM_DIR / name).exists()
        assert cuda_ipc.read_export_pid(SHM_DIR / name) == os.getpid()
        h = handle(export.address("127.0.0.1:7001"), [6, 7])
        result = pull_cuda_ipc(h, KvCacheView([], 4, num_blocks=2), [0, 1])
        assert (result.nbytes, result.blocks, result.transport) == (0, 2, "cuda-ipc")
    assert not (SHM_DIR / name).exists()


# -- on a GPU ---------------------------------------------------------------------------------

def _gpu_caches(num_blocks, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_blocks * 4, 2, 8, generator=g).to(dtype).cuda() for _ in range(3)]


def _holder(name, ready, done):
    caches = _gpu_caches(10, seed=7)
    torch.cuda.synchronize()
    export = CudaIpcExport.create(name, caches, 4)
    ready.put(export.address("127.0.0.1:7001"))
    done.get(timeout=120)
    export.close()


@needs_cuda
def test_pull_across_processes_is_bit_identical(name):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_holder, args=(name, ready, done))
    proc.start()
    try:
        address = ready.get(timeout=120)
        expected = KvCacheView(_gpu_caches(10, seed=7), 4)
        dest = KvCacheView([torch.zeros(2, 24, 2, 8, dtype=torch.float16, device="cuda")
                            for _ in range(3)], 4)
        result = pull_cuda_ipc(handle(address, [9, 2, 3, 4]), dest, [0, 1, 2, 5])
        assert (result.transport, result.blocks) == ("cuda-ipc", 4)
        assert result.nbytes == 4 * dest.layout.block_nbytes
        assert torch.equal(dest.read_blocks([0, 1, 2, 5]), expected.read_blocks([9, 2, 3, 4]))
        assert not dest.read_blocks([3, 4]).any()
        cuda_ipc.forget_opened()
        torch.cuda.synchronize()
    finally:
        done.put("stop")
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


@needs_cuda
def test_pull_inside_the_exporting_process(name):
    caches = _gpu_caches(6, seed=3, dtype=torch.bfloat16)
    with CudaIpcExport.create(name, caches, 4) as export:
        dest = KvCacheView([torch.zeros(2, 12, 2, 8, dtype=torch.bfloat16, device="cuda")
                            for _ in range(3)], 4)
        pull_cuda_ipc(handle(export.address("127.0.0.1:7001"), [5, 0]), dest, [2, 0])
        assert torch.equal(dest.read_blocks([2, 0]), export.view.read_blocks([5, 0]))


def test_a_dead_exporters_file_is_removed_as_stale(name):
    import json
    import subprocess
    import sys

    from kvcache.transfer.shm import remove_stale_segments

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (SHM_DIR / name).write_text(json.dumps({"magic": cuda_ipc.MAGIC, "pid": int(dead),
                                            "layout": {}, "layers": []}))
    with CudaIpcExport.create(f"{name}-live", [], 4, num_blocks=2):
        assert remove_stale_segments(name) == [name]
        assert [p.name for p in SHM_DIR.glob(f"{name}*")] == [f"{name}-live"]
