"""Engine configuration: KV cache geometry and the scheduler's per-step limits.

One frozen :class:`EngineConfig` per engine, validated when built; a bad value raises
ValueError naming the field, the value and what to set instead. The block size and hash seed
also define the prefix-cache hashes (:attr:`EngineConfig.hash_config`), which a router must
share with the worker for its prefix lookups to match.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.hashing import BlockHashConfig


def _positive_int(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}")


@dataclass(frozen=True)
class EngineConfig:
    """What one engine (torch or mocker runner) schedules with.

    - ``block_size``: tokens per KV block (also the prefix-cache hash granularity).
    - ``num_blocks``: physical KV blocks of the worker.
    - ``max_num_seqs``: most requests running (holding KV blocks) at once.
    - ``max_num_batched_tokens``: token budget of one step, shared by decodes (1 token each)
      and prefill chunks (chunked prefill: a longer prompt continues next step).
    - ``max_model_len``: longest sequence (prompt + output); None takes the runner's.
    - ``enable_prefix_caching``: reuse KV blocks of identical prefixes across requests.
    - ``hash_seed``: seed of the block hashes (must match the router's).
    """

    block_size: int = 16
    num_blocks: int = 1024
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    hash_seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("block_size", self.block_size, "use the KV block size in tokens, e.g. 16")
        _positive_int("num_blocks", self.num_blocks,
                      "give the number of KV blocks the worker's cache holds, e.g. 1024")
        _positive_int("max_num_seqs", self.max_num_seqs,
                      "set how many requests may run at once, e.g. 256")
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens,
                      "set the per-step token budget, e.g. 2048")
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len,
                          "give the longest sequence in tokens, or None to use the model's")
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(
                f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if isinstance(self.hash_seed, bool) or not isinstance(self.hash_seed, int) \
                or not 0 <= self.hash_seed < 2**64:
            raise ValueError(
                f"hash_seed must be an integer in [0, 2**64), got {self.hash_seed!r}; "
                "use the same seed as the router (default 0)")

    @property
    def hash_config(self) -> BlockHashConfig:
        """The block-hash parameters a router must share with this engine."""
        return BlockHashConfig(block_size=self.block_size, seed=self.hash_seed)

    @property
    def num_cache_tokens(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.block_size * self.num_blocks

    def resolve_max_model_len(self, runner_max_model_len: int) -> int:
        """The effective context limit: ours if set (it may not exceed the model's)."""
        _positive_int("runner max_model_len", runner_max_model_len,
                      "the runner must report its model's context length")
        if self.max_model_len is None:
            return runner_max_model_len
        if self.max_model_len > runner_max_model_len:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's context of "
                f"{runner_max_model_len} tokens; set max_model_len <= {runner_max_model_len} "
                "or leave it unset")
        return self.max_model_len


__all__ = ["EngineConfig"]
