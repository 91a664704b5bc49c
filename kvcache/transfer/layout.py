"""The paged KV cache as the transfer layer sees it: its layout, and block-level reads and writes.

Cache layout (fixed by ``workers/model/llama.py`` ``make_kv_caches``): a list with one tensor
per layer, each ``[2, num_blocks * block_size, num_kv_heads, head_dim]`` (keys, then values),
all of one dtype, contiguous, on one device. Block ``b`` of layer ``l`` is
``caches[l][:, b * block_size:(b + 1) * block_size]``: two runs of ``block_size * num_kv_heads *
head_dim`` elements, one for the keys and one for the values.

A mocker engine has no KV data: its "cache" is an empty list, a layout with zero layers (pass
``num_blocks``, which a list without tensors cannot tell). Every operation works on it and
moves zero bytes, so disaggregation runs end to end in simulations.

Bytes of one block for layers ``[start, end)`` (what one ``ferry.v1.KvChunk`` carries): for
each layer in order, that block's ``[2, block_size, num_kv_heads, head_dim]`` slots, contiguous,
in the cache dtype: ``(end - start) * layout.layer_block_nbytes`` bytes.

Two workers can exchange blocks when their layouts are *compatible*: equal ``num_layers``,
``block_size``, ``num_kv_heads``, ``head_dim`` and ``dtype`` (``num_blocks`` may differ).
:meth:`KvLayout.check_compatible` raises :class:`~kvcache.transfer.errors.KvLayoutMismatch`
naming every field that differs.

Thread safety: a view reads and writes the caches in place with no lock. The block pool's
ownership rules make that safe: a pinned block is never written by its holder, and a block a
puller writes belongs to the puller's request alone until it is committed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from kvcache.transfer.errors import KvLayoutMismatch

_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2",
                 "int8", "uint8")
    if hasattr(torch, name)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KvLayout:
    """Shape and dtype of a worker's paged KV cache (see the module docstring)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_blocks: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KvLayout.{name} must be a non-negative integer, got {value!r}")
        if self.block_size == 0 or self.num_blocks == 0:
            raise ValueError(
                f"KvLayout.block_size and num_blocks must be positive, got {self.block_size} "
                f"and {self.num_blocks}"
            )
        if self.num_layers and (self.num_kv_heads == 0 or self.head_dim == 0):
            raise ValueError(
                "KvLayout.num_kv_heads and head_dim must be positive when there are layers, "
                f"got {self.num_kv_heads} and {self.head_dim}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"KvLayout.dtype {self.dtype!r} is not a supported KV dtype; use one of "
                f"{sorted(_DTYPES)}"
            )

    @classmethod
    def of(
        cls, caches: Sequence[torch.Tensor], block_size: int, *, num_blocks: int | None = None
    ) -> KvLayout:
        """The layout of ``caches`` (a ``make_kv_caches`` list; ``[]`` for a mocker, which then
        needs ``num_blocks``). Raises ValueError when the tensors do not follow the layout."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not caches:
            if num_blocks is None:
                raise ValueError(
                    "a KV cache without layers (mocker) needs num_blocks: pass "
                    "KvLayout.of([], block_size, num_blocks=N)"
                )
            return cls(0, block_size, 0, 0, "float32", num_blocks)
        first = caches[0]
        if first.dim() != 4 or first.shape[0] != 2:
            raise ValueError(
                "each KV cache tensor must be [2, num_blocks * block_size, num_kv_heads, "
                f"head_dim], got shape {tuple(first.shape)}"
            )
        slots = first.shape[1]
        if slots % block_size:
            raise ValueError(
                f"KV cache has {slots} slots, not a multiple of block_size {block_size}"
            )
        for i, cache in enumerate(caches):
            if cache.shape != first.shape or cache.dtype != first.dtype:
                raise ValueError(
                    f"KV cache of layer {i} is {tuple(cache.shape)} {cache.dtype}, layer 0 is "
                    f"{tuple(first.shape)} {first.dtype}: all layers must be alike"
                )
            if cache.device != first.device:
                raise ValueError(
                    f"KV cache of layer {i} is on {cache.device}, layer 0 on {first.device}"
                )
            if not cache.is_contiguous():
                raise ValueError(f"KV cache of layer {i} is not contiguous")
        derived = slots // block_size
        if num_blocks is not None and num_blocks != derived:
            raise ValueError(f"num_blocks={num_blocks} but the caches hold {derived} blocks")
        if dtype_name(first.dtype) not in _DTYPES:
            raise ValueError(f"unsupported KV cache dtype {first.dtype}")
        return cls(len(caches), block_size, int(first.shape[2]), int(first.shape[3]),
                   dtype_name(first.dtype), derived)

    # -- sizes --------------------------------------------------------------------------------

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer's cache tensor."""
        return (2, self.num_blocks * self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def layer_block_nbytes(self) -> int:
        """Bytes of one block in one layer (keys and values)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers (0 for a mocker)."""
        return self.num_layers * self.layer_block_nbytes

    @property
    def layer_nbytes(self) -> int:
        """Bytes of one layer's cache tensor."""
        return self.num_blocks * self.layer_block_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache."""
        return self.num_layers * self.layer_nbytes

    # -- compatibility ------------------------------------------------------------------------

    def mismatches(self, other: KvLayout) -> list[str]:
        """The fields (other than num_blocks) in which ``other`` differs, as ``"name a != b"``."""
        names = ["num_layers", "block_size"]
        if self.num_layers and other.num_layers:
            names += ["num_kv_heads", "head_dim", "dtype"]
        return [
            f"{name} {getattr(self, name)} != {getattr(other, name)}"
            for name in names
            if getattr(self, name) != getattr(other, name)
        ]

    def check_compatible(self, other: KvLayout, *, this: str = "puller",
                         that: str = "holder") -> None:
        """Raise KvLayoutMismatch naming every difference between this layout and ``other``."""
        diffs = self.mismatches(other)
        if diffs:
            raise KvLayoutMismatch(
                f"KV layouts differ ({this} vs {that}): {'; '.join(diffs)}. Prefill and decode "
                "workers must serve the same model with the same KV dtype and block size"
            )

    def layer_groups(self, max_chunk_bytes: int) -> list[tuple[int, int]]:
        """Split the layers into ``[start, end)`` ranges of at most ``max_chunk_bytes`` per
        block (one chunk each). Raises ValueError when a single layer of a block is larger."""
        if self.num_layers == 0:
            return []
        per_chunk = max_chunk_bytes // self.layer_block_nbytes
        if per_chunk < 1:
            raise ValueError(
                f"one layer of a block is {self.layer_block_nbytes} bytes, more than "
                f"max_chunk_bytes={max_chunk_bytes}; raise max_chunk_bytes"
            )
        return [(s, min(s + per_chunk, self.num_layers))
                for s in range(0, self.num_layers, per_chunk)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KvLayout:
        try:
            return cls(**{name: data[name] for name in (
                "num_layers", "block_size", "num_kv_heads", "head_dim", "dtype", "num_blocks")})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a KV layout description: {data!r}") from exc


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Coalesce ``src_ids[i] -> dst_ids[i]`` into ``(src_start, dst_start, count)`` runs where
    both sides are consecutive, so a copy needs one call per run instead of one per block."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs:
            s0, d0, k = runs[-1]
            if s == s0 + k and d == d0 + k:
                runs[-1] = (s0, d0, k + 1)
                continue
        runs.append((s, d, 1))
    return runs


def readonly_bytes_tensor(data) -> torch.Tensor:
    """A uint8 tensor over ``data`` (bytes, a read-only mmap, ...) without copying. The caller
    only reads it; torch's one-time "buffer is not writable" warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


class KvCacheView:
    """Block-level access to a worker's KV caches (see the module docstring)."""

    def __init__(self, caches: Sequence[torch.Tensor], block_size: int, *,
                 num_blocks: int | None = None) -> None:
        self.caches = list(caches)
        self.layout = KvLayout.of(self.caches, block_size, num_blocks=num_blocks)
        self.device = self.caches[0].device if self.caches else torch.device("cpu")
        lay = self.layout
        # Per layer: uint8 [2, num_blocks, block_size * heads * head_dim * itemsize]; block b of
        # layer l is rows[l][:, b]. Views, no copies.
        self._rows = [c.view(torch.uint8).view(2, lay.num_blocks, -1) for c in self.caches]
        self._np_rows = [r.numpy() for r in self._rows] if self.device.type == "cpu" else None

    def __repr__(self) -> str:
        return f"KvCacheView({self.layout}, device={self.device})"

    def check_block_ids(self, block_ids: Sequence[int], *, what: str = "block id",
                        unique: bool = False) -> list[int]:
        """``block_ids`` as a list of ints, each in ``[0, num_blocks)``; ValueError otherwise."""
        ids = list(block_ids)
        for b in ids:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.layout.num_blocks:
                raise ValueError(
                    f"{what} {b!r} out of range: this cache has blocks 0..{self.layout.num_blocks - 1}"
                )
        if unique and len(set(ids)) != len(ids):
            raise ValueError(f"{what}s must be distinct, got {ids}")
        return ids

    # -- whole blocks, all layers ---------------------------------------------------------------

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A contiguous copy ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]`` of the
        blocks, on the cache device."""
        ids = self.check_block_ids(block_ids)
        lay = self.layout
        shape = (lay.num_layers, 2, len(ids), lay.block_size, lay.num_kv_heads, lay.head_dim)
        out = torch.empty(shape, dtype=lay.torch_dtype, device=self.device)
        if ids and self.caches:
            index = torch.tensor(ids, dtype=torch.long, device=self.device)
            for layer, cache in enumerate(self.caches):
                blocked = cache.view(2, lay.num_blocks, lay.block_size, lay.num_kv_heads,
                                     lay.head_dim)
                torch.index_select(blocked, 1, index, out=out[layer])
        return out

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write ``data`` (shaped as :meth:`read_blocks` returns, same dtype) into the blocks."""
        ids = self.check_block_ids(block_ids, unique=True)
        lay = self.layout
        shape = (lay.num_layers, 2, len(ids), lay.block_size, lay.num_kv_heads, lay.head_dim)
        if tuple(data.shape) != shape or data.dtype != lay.torch_dtype:
            raise ValueError(
                f"write_blocks needs a {lay.dtype} tensor of shape {shape}, got "
                f"{data.dtype} {tuple(data.shape)}"
            )
        if not ids or not self.caches:
            return
        index = torch.tensor(ids, dtype=torch.long, device=self.device)
        data = data.to(self.device)
        for layer, cache in enumerate(self.caches):
            blocked = cache.view(2, lay.num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
            blocked.index_copy_(1, index, data[layer])

    # -- one block, a range of layers, as bytes (the gRPC chunk) --------------------------------

    def read_block_bytes(self, block_id: int, layer_start: int, layer_end: int) -> torch.Tensor:
        """One chunk's payload: block ``block_id`` of layers ``[layer_start, layer_end)`` as a
        contiguous CPU uint8 tensor of ``(end - start) * layer_block_nbytes`` bytes."""
        self._check_layers(layer_start, layer_end)
        parts = [self._rows[layer][:, block_id] for layer in range(layer_start, layer_end)]
        if not parts:
            return torch.empty(0, dtype=torch.uint8)
        return torch.stack(parts).reshape(-1).cpu()

    def block_pieces(self, block_id: int, layer_start: int, layer_end: int) -> list:
        """The payload of :meth:`read_block_bytes` as a list of buffers whose concatenation is
        that payload: for a CPU cache, zero-copy views of the cache memory (keys then values of
        each layer); for a GPU cache, one host copy."""
        self._check_layers(layer_start, layer_end)
        if self._np_rows is None:
            return [self.read_block_bytes(block_id, layer_start, layer_end).numpy()]
        return [self._np_rows[layer][kv, block_id]
                for layer in range(layer_start, layer_end) for kv in (0, 1)]

    def write_block_bytes(self, block_id: int, layer_start: int, layer_end: int,
                          data) -> None:
        """Write one chunk's payload (a uint8 tensor as :meth:`read_block_bytes` gives, or any
        buffer of those bytes) into block ``block_id``. Raises ValueError when its size is not
        the chunk's size. A CPU cache is written with plain memory copies (numpy: no thread
        pool spin-up per chunk), a GPU cache with one host-to-device copy per layer."""
        self._check_layers(layer_start, layer_end)
        count = layer_end - layer_start
        expected = count * self.layout.layer_block_nbytes
        size = data.numel() if isinstance(data, torch.Tensor) else memoryview(data).nbytes
        if size != expected:
            raise ValueError(
                f"chunk for block {block_id} layers [{layer_start}, {layer_end}) must hold "
                f"{expected} bytes, got {size}"
            )
        if not count:
            return
        if self._np_rows is not None:
            src = (data.numpy() if isinstance(data, torch.Tensor)
                   else np.frombuffer(data, dtype=np.uint8)).reshape(count, 2, -1)
            for i, layer in enumerate(range(layer_start, layer_end)):
                np.copyto(self._np_rows[layer][:, block_id], src[i])
            return
        if not isinstance(data, torch.Tensor):
            data = readonly_bytes_tensor(data)
        src = data.to(self.device).view(count, 2, -1)
        dst = [self._rows[layer][:, block_id] for layer in range(layer_start, layer_end)]
        torch._foreach_copy_(dst, list(src.unbind(0)))

    def _check_layers(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.layout.num_layers:
            raise ValueError(
                f"layer range [{start}, {end}) outside [0, {self.layout.num_layers})"
            )

    # -- block to block, in one address space (shared memory, CUDA IPC) -------------------------

    def copy_blocks_from(
        self,
        source: KvCacheView,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Copy ``source``'s blocks into this cache's ``dst_block_ids`` (one copy, consecutive
        ids coalesced). Checks layouts first. ``should_stop`` is polled between copies: when it
        returns True the copy stops early and this returns -1 (the destination blocks are then
        partly written). Returns the bytes copied."""
        self.layout.check_compatible(source.layout)
        src = source.check_block_ids(src_block_ids, what="source block id")
        dst = self.check_block_ids(dst_block_ids, what="destination block id", unique=True)
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} source blocks but {len(dst)} destination blocks")
        stopped = False
        for s0, d0, k in block_runs(src, dst):
            if should_stop is not None and should_stop():
                stopped = True
                break
            dst_parts = [rows[:, d0:d0 + k] for rows in self._rows]
            src_parts = [rows[:, s0:s0 + k] for rows in source._rows]
            if dst_parts and source.device == self.device:
                torch._foreach_copy_(dst_parts, src_parts)
            else:
                for d, s in zip(dst_parts, src_parts):
                    d.copy_(s)
        for device in {self.device, source.device}:  # no copy may still run once this returns
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return -1 if stopped else len(dst) * self.layout.block_nbytes
