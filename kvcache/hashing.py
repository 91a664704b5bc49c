"""The one block-hash function of Ferry, shared by workers and router.

A prompt is cut into full blocks of ``block_size`` tokens (a trailing partial block is never
hashed). Block ``i`` gets a 64-bit hash chained on the hash of block ``i - 1``:

    h_i = blake2b-64( seed (u64 LE) || h_{i-1} (u64 LE; 0 for the first block) || tokens (u32 LE) )

read back as an unsigned little-endian integer. The result depends only on the seed, the
block size (through which tokens fall in a block) and the token ids: it is the same in every
process and on every machine (no use of Python's salted ``hash``). Two sequences share the
hash of block ``i`` exactly when they share their first ``(i + 1) * block_size`` tokens
(up to blake2b collisions).

A different seed or block size between a worker and a router gives no matches at all, so
both are carried in :class:`BlockHashConfig` and compared when a worker registers.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_U64 = struct.Struct("<QQ")


@dataclass(frozen=True)
class BlockHashConfig:
    """What a worker and a router must agree on for block hashes to match."""

    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"hash seed must be an integer in [0, 2**64), got {self.seed!r}")

    def check_compatible(self, other: BlockHashConfig, who: str = "worker") -> None:
        """Raise ValueError naming the fix when ``other`` would hash blocks differently."""
        if other.block_size != self.block_size:
            raise ValueError(
                f"{who} uses block_size={other.block_size} but this router uses "
                f"block_size={self.block_size}; start both with the same --block-size"
            )
        if other.seed != self.seed:
            raise ValueError(
                f"{who} uses hash seed {other.seed} but this router uses {self.seed}; "
                "start both with the same --hash-seed"
            )


def hash_block(parent: int | None, token_ids: Sequence[int], seed: int = 0) -> int:
    """Hash of one full block chained on ``parent`` (None for the first block)."""
    tokens = np.asarray(token_ids, dtype="<u4").tobytes()
    digest = hashlib.blake2b(_U64.pack(seed, parent or 0) + tokens, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hash_blocks(
    token_ids: Sequence[int], config: BlockHashConfig, parent: int | None = None
) -> list[int]:
    """Chained hashes of every full block of ``token_ids`` (a partial tail is skipped)."""
    bs = config.block_size
    n_full = len(token_ids) // bs
    if n_full == 0:
        return []
    data = np.asarray(token_ids[: n_full * bs], dtype="<u4").tobytes()
    step = bs * 4
    out: list[int] = []
    seed = config.seed
    prev = parent or 0
    blake = hashlib.blake2b
    pack = _U64.pack
    for i in range(n_full):
        prev = int.from_bytes(
            blake(pack(seed, prev) + data[i * step : (i + 1) * step], digest_size=8).digest(),
            "little",
        )
        out.append(prev)
    return out
