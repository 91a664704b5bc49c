"""SharedKvArena in one process: caches inside one /dev/shm file, attach read-only, pull_shm with
exact values, the address format, cleanup (no segment left behind), stale-segment removal."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import uuid

import pytest
import torch

from kvcache.transfer.errors import KvLayoutMismatch
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvCacheView, KvLayout
from kvcache.transfer.shm import (
    HEADER_BYTES,
    SHM_DIR,
    SegmentNotFound,
    SharedKvArena,
    attach,
    attached_names,
    detach,
    detach_all,
    pull_shm,
    read_header,
    remove_stale_segments,
)

LAYOUT = KvLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16",
                  num_blocks=6)


@pytest.fixture
def prefix():
    """A name prefix of this test's own; asserts that no segment with it is left behind."""
    name = f"ferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    detach_all()
    leftovers = sorted(p.name for p in SHM_DIR.glob(f"{name}*"))
    for p in leftovers:
        os.unlink(SHM_DIR / p)
    assert leftovers == [], f"segments left in /dev/shm: {leftovers}"


def fill(caches):
    for layer, cache in enumerate(caches):
        cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(layer))
                    .to(cache.dtype))


def handle(address, block_ids, block_size=4):
    tokens = len(block_ids) * block_size - 1  # a partial last block: one hash fewer
    return KvHandleInfo("h1", "p", tuple(block_ids), tuple(range(len(block_ids) - 1)), tokens,
                        block_size, address)


def test_arena_caches_follow_the_layout_inside_one_segment(prefix):
    with SharedKvArena.create(f"{prefix}-a", LAYOUT) as arena:
        path = SHM_DIR / f"{prefix}-a"
        assert arena.path == path and path.exists()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert len(arena.caches) == 2
        for cache in arena.caches:
            assert cache.shape == LAYOUT.layer_shape and cache.dtype == torch.bfloat16
            assert cache.is_contiguous() and not cache.any()
        assert KvLayout.of(arena.caches, 4) == LAYOUT
        assert arena.view.layout == LAYOUT
        assert path.stat().st_size == HEADER_BYTES + 2 * 4096  # each layer page-aligned
        header = read_header(path)
        assert header["pid"] == os.getpid() and KvLayout.from_dict(header["layout"]) == LAYOUT
        assert arena.address("127.0.0.1:7001") == f"shm://{prefix}-a@127.0.0.1:7001"
    assert not path.exists() and arena.closed
    arena.close()  # idempotent


def test_an_attached_view_sees_the_holders_writes(prefix):
    with SharedKvArena.create(f"{prefix}-b", LAYOUT) as arena:
        fill(arena.caches)
        view = attach(arena.name)
        assert view.layout == LAYOUT
        assert torch.equal(view.read_blocks(range(6)), arena.view.read_blocks(range(6)))
        assert attach(arena.name) is view  # mapped once, reused
        detach(arena.name)
        assert attach(arena.name) is not view
        arena.caches[1][0, 5] = 3.0
        assert view.caches[1][0, 5].eq(3.0).all()


def test_pull_shm_copies_exact_blocks_into_the_destination(prefix):
    with SharedKvArena.create(f"{prefix}-c", LAYOUT) as arena:
        fill(arena.caches)
        dest = KvCacheView([torch.zeros(2, 40, 2, 8, dtype=torch.bfloat16) for _ in range(2)], 4)
        h = handle(arena.address("127.0.0.1:7001"), [4, 1, 2])
        result = pull_shm(h, dest, [9, 0, 1])
        assert (result.transport, result.blocks) == ("shm", 3)
        assert result.nbytes == 3 * LAYOUT.block_nbytes
        assert torch.equal(dest.read_blocks([9, 0, 1]), arena.view.read_blocks([4, 1, 2]))
        assert not dest.read_blocks([2, 3, 8]).any()
        sub = pull_shm(h, dest, [5], src_block_ids=[2])
        assert sub.blocks == 1
        assert torch.equal(dest.read_blocks([5]), arena.view.read_blocks([2]))
        with pytest.raises(ValueError, match="source block ids \\[3\\] are not in KV handle"):
            pull_shm(h, dest, [5], src_block_ids=[3])
        wrong = KvCacheView([torch.zeros(2, 40, 2, 8, dtype=torch.float16) for _ in range(2)], 4)
        with pytest.raises(KvLayoutMismatch, match="dtype float16 != bfloat16"):
            pull_shm(h, wrong, [0, 1, 2])


def test_a_missing_segment_is_segment_not_found(prefix):
    h = handle(f"shm://{prefix}-none@127.0.0.1:7001", [0])
    dest = KvCacheView([torch.zeros(2, 8, 2, 8, dtype=torch.bfloat16) for _ in range(2)], 4)
    with pytest.raises(SegmentNotFound, match="no shared-memory KV segment") as info:
        pull_shm(h, dest, [0])
    assert info.value.code == "UNAVAILABLE"
    arena = SharedKvArena.create(f"{prefix}-gone", LAYOUT)
    attach(arena.name)
    arena.close()
    with pytest.raises(SegmentNotFound):
        attach(arena.name)  # a cached mapping of a closed segment is not used


def test_create_refuses_an_existing_name_and_bad_names(prefix):
    with SharedKvArena.create(f"{prefix}-d", LAYOUT), \
            pytest.raises(FileExistsError, match="remove_stale_segments"):
        SharedKvArena.create(f"{prefix}-d", LAYOUT)
    with pytest.raises(ValueError, match="must be 1-200 letters"):
        SharedKvArena.create("../etc", LAYOUT)
    huge = KvLayout(1, 16, 1024, 1024, "float32", 10**7)
    with pytest.raises(ValueError, match="lower num_blocks or enlarge /dev/shm"):
        SharedKvArena.create(f"{prefix}-huge", huge)


def test_zero_layer_arena_for_the_mocker(prefix):
    mock = KvLayout.of([], 16, num_blocks=8)
    with SharedKvArena.create(f"{prefix}-m", mock) as arena:
        assert arena.caches == [] and arena.path.stat().st_size == HEADER_BYTES
        dest = KvCacheView([], 16, num_blocks=4)
        h = KvHandleInfo("h", "p", (7, 3), (11,), 20, 16, arena.address("127.0.0.1:1"))
        result = pull_shm(h, dest, [0, 1])
        assert (result.nbytes, result.blocks) == (0, 2)


def test_the_creator_unlinks_at_exit_and_stale_segments_are_removed(prefix):
    code = (
        "import os, sys\n"
        "from kvcache.transfer.shm import SharedKvArena\n"
        "from kvcache.transfer.layout import KvLayout\n"
        "lay = KvLayout(1, 4, 1, 4, 'float32', 2)\n"
        f"a = SharedKvArena.create('{prefix}-exit', lay)\n"  # never closed: unlinked at exit
        f"b = SharedKvArena.create('{prefix}-killed', lay)\n"
        "print('made', flush=True)\n"
        "os._exit(0)\n"  # no interpreter cleanup, as when killed
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["proto", "."])}
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "made", out.stderr
    left = sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))
    assert left == [f"{prefix}-exit", f"{prefix}-killed"]
    with SharedKvArena.create(f"{prefix}-alive", LAYOUT):
        removed = remove_stale_segments(prefix)
        assert sorted(removed) == left
        assert [p.name for p in SHM_DIR.glob(f"{prefix}*")] == [f"{prefix}-alive"]

    graceful = code.replace("os._exit(0)", "sys.exit(0)").replace("-killed", "-second")
    out = subprocess.run([sys.executable, "-c", graceful], check=False, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert list(SHM_DIR.glob(f"{prefix}*")) == []


def test_attaching_forgets_segments_that_are_gone(prefix):
    first = SharedKvArena.create(f"{prefix}-a", LAYOUT)
    attach(first.name)
    first.close()  # its holder stopped: nobody will pull from it again
    with SharedKvArena.create(f"{prefix}-b", LAYOUT) as second:
        attach(second.name)
        assert [n for n in attached_names() if n.startswith(prefix)] == [second.name]


def test_a_full_dev_shm_is_a_value_error_not_a_sigbus_later(prefix, monkeypatch):
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(ValueError, match=r"/dev/shm has no room for the KV arena's \d+ bytes"):
        SharedKvArena.create(f"{prefix}-full", LAYOUT)
    assert not (SHM_DIR / f"{prefix}-full").exists()


def test_a_stale_segment_that_cannot_be_removed_is_skipped(prefix, monkeypatch):
    from kvcache.transfer import shm

    probe = subprocess.Popen(["true"])  # its pid is nobody's once reaped
    probe.wait()
    header = b'{"pid": %d, "layout": {}, "layer_stride": 0}' % probe.pid
    path = SHM_DIR / f"{prefix}-other-user"
    path.write_bytes(shm.MAGIC + struct.pack("<I", len(header)) + header)

    def refuse(p):
        raise PermissionError(1, "Operation not permitted", str(p))

    monkeypatch.setattr(shm, "_unlink_quietly", refuse)
    assert remove_stale_segments(prefix) == []  # skipped, not raised
    monkeypatch.undo()
    assert remove_stale_segments(prefix) == [path.name]
