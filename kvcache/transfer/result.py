"""What a pull returns, and the argument checks every transport shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.transfer.errors import KvLayoutMismatch
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvCacheView


@dataclass(frozen=True)
class PullResult:
    """A completed pull: ``nbytes`` of KV in ``blocks`` destination blocks, in ``seconds`` of
    wall time, over ``transport`` (``"grpc"``, ``"shm"`` or ``"cuda-ipc"``). ``released`` is
    whether the pull's own ReleaseHandle ended the handle (None when it did not release)."""

    nbytes: int
    blocks: int
    seconds: float
    transport: str
    released: bool | None = None

    @property
    def gbps(self) -> float:
        """GB/s (10**9 bytes per second)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def check_pull_args(
    handle: KvHandleInfo,
    dest_view: KvCacheView,
    dest_block_ids: Sequence[int],
    src_block_ids: Sequence[int] | None,
) -> tuple[list[int], list[int]]:
    """``(src, dst)`` block id lists after checking them against the handle and the
    destination cache. A block-size mismatch raises KvLayoutMismatch; a caller's bug
    (lengths, ids outside the handle or the cache) raises ValueError."""
    if handle.block_size != dest_view.layout.block_size:
        raise KvLayoutMismatch(
            f"KV handle {handle.handle_id!r} has block_size {handle.block_size} but this cache "
            f"uses {dest_view.layout.block_size}; start prefill and decode workers with the "
            "same --block-size"
        )
    src = list(handle.block_ids) if src_block_ids is None else list(src_block_ids)
    outside = sorted(set(src) - set(handle.block_ids))
    if outside:
        raise ValueError(f"source block ids {outside} are not in KV handle {handle.handle_id!r}")
    if len(set(src)) != len(src):
        raise ValueError(f"source block ids must be distinct, got {src}")
    dst = dest_view.check_block_ids(dest_block_ids, what="destination block id", unique=True)
    if len(dst) != len(src):
        raise ValueError(
            f"{len(src)} blocks to pull from KV handle {handle.handle_id!r} but "
            f"{len(dst)} destination block ids"
        )
    return src, dst
