"""Mooncake-format request traces turned into token ids, for benchmarks and trace replay.

A trace line is one JSON object: ``timestamp`` (ms since the trace start), ``input_length``
and ``output_length`` (tokens) and ``hash_ids``: one id per ``TRACE_BLOCK_TOKENS`` (512)
tokens of the prompt, equal ids meaning equal content, so two requests share a prefix exactly
as long as their leading equal ids.

To run a trace through real hashing, each hash id becomes 512 deterministic token ids:
token ``j`` of id ``h`` is read from ``blake2b(TRACE_SALT || h || k)`` (``k = j // 16``: one
64-byte digest gives 16 little-endian u32 draws), mapped onto ``[first_token, vocab_size)``.
The same id gives the same tokens in every process, on every machine; different ids give
different tokens (up to blake2b collisions). A prompt is the concatenation of its ids' tokens
cut to ``input_length`` (the last id usually covers a partial block).

Pure functions, no file access: the caller reads the lines.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

TRACE_BLOCK_TOKENS = 512
TRACE_SALT = b"ferry-trace-v1\x00\x00"  # 16 bytes
_DRAWS = struct.Struct("<16I")


@dataclass(frozen=True)
class TraceRequest:
    """One trace line."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.input_length < 1 or self.output_length < 0:
            raise ValueError(
                f"a trace request needs input_length >= 1 and output_length >= 0, got "
                f"{self.input_length} and {self.output_length}"
            )
        if len(self.hash_ids) * TRACE_BLOCK_TOKENS < self.input_length:
            raise ValueError(
                f"{len(self.hash_ids)} hash ids cover {len(self.hash_ids) * TRACE_BLOCK_TOKENS} "
                f"tokens, fewer than input_length={self.input_length}"
            )


def parse_trace_line(line: str) -> TraceRequest:
    """One Mooncake JSON line -> :class:`TraceRequest` (a clear error naming the bad field)."""
    try:
        obj = json.loads(line)
        return TraceRequest(
            timestamp_ms=float(obj["timestamp"]),
            input_length=int(obj["input_length"]),
            output_length=int(obj["output_length"]),
            hash_ids=tuple(int(h) for h in obj["hash_ids"]),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"not a Mooncake trace line ({e!r}); expected timestamp, input_length, "
            f"output_length, hash_ids: {line[:120]!r}"
        ) from None


def hash_id_tokens(hash_id: int, vocab_size: int, first_token: int = 0) -> tuple[int, ...]:
    """The 512 token ids that stand for trace hash id ``hash_id``."""
    if not 0 <= first_token < vocab_size:
        raise ValueError(f"need 0 <= first_token < vocab_size, got {first_token}, {vocab_size}")
    if not 0 <= hash_id < 2**64:
        raise ValueError(f"hash ids are integers in [0, 2**64), got {hash_id}")
    return _tokens(hash_id, vocab_size, first_token)


@lru_cache(maxsize=1024)  # recent prefixes are re-read often; ~20 KB an entry
def _tokens(hash_id: int, vocab_size: int, first_token: int) -> tuple[int, ...]:
    span = vocab_size - first_token
    key = TRACE_SALT + hash_id.to_bytes(8, "little")
    out: list[int] = []
    for k in range(TRACE_BLOCK_TOKENS // 16):
        digest = hashlib.blake2b(key + k.to_bytes(4, "little"), digest_size=64).digest()
        out.extend(first_token + d % span for d in _DRAWS.unpack(digest))
    return tuple(out)


def request_token_ids(hash_ids: Sequence[int], input_length: int, vocab_size: int,
                      first_token: int = 0) -> list[int]:
    """The prompt of a trace request: its ids' tokens concatenated, cut to ``input_length``."""
    if input_length > len(hash_ids) * TRACE_BLOCK_TOKENS:
        raise ValueError(
            f"input_length={input_length} exceeds the {len(hash_ids) * TRACE_BLOCK_TOKENS} "
            f"tokens that {len(hash_ids)} hash ids cover"
        )
    out: list[int] = []
    for h in hash_ids[: -(-input_length // TRACE_BLOCK_TOKENS)]:
        out.extend(hash_id_tokens(h, vocab_size, first_token))
    del out[input_length:]
    return out


def trace_token_ids(request: TraceRequest, vocab_size: int, first_token: int = 0) -> list[int]:
    return request_token_ids(request.hash_ids, request.input_length, vocab_size, first_token)
