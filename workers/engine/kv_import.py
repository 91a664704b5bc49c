"""Decode side of disaggregation, engine part: taking in KV blocks computed by another worker.

Protocol (every function here runs on the engine's thread, between steps; the transport that
fills the blocks runs anywhere):

1. :func:`plan_import` checks the handle against the request (same block size; its block
   hashes are those of the request's own leading prompt blocks, so KV of other tokens can
   never be imported), skips the leading blocks this worker already caches, and reserves
   fresh blocks for the rest (``kvcache.holds``). When they do not fit now the plan has no
   reservation and the request simply prefills locally.
2. The transport writes the pulled KV into ``plan.dest_block_ids`` (handle blocks
   ``plan.skip_blocks ..`` in order).
3. :func:`commit_import` hashes the filled blocks into the prefix cache (their BlockStored
   events go out with the next step's batch) and drops the reservation; or, when the pull
   failed, :func:`abandon_import` frees them unhashed.
4. The request is then added as a plain request: its prefix lookup finds the blocks and only
   the rest of the prompt is computed. Should the blocks be evicted in between (a full pool),
   it computes them again: an import only ever saves work, it never changes tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.hashing import hash_blocks
from workers.engine.engine import LLMEngine


class ImportRefused(ValueError):
    """The handle does not fit the request (another block size, or other tokens)."""


@dataclass(frozen=True)
class ImportPlan:
    block_hashes: tuple[int, ...]  # all of the handle's block hashes
    skip_blocks: int  # leading handle blocks already cached here (not pulled)
    hold_id: str | None  # the reservation for the rest; None: nothing to pull or no room
    dest_block_ids: tuple[int, ...]  # where handle blocks skip_blocks.. go, in order

    @property
    def pull_blocks(self) -> int:
        return len(self.dest_block_ids)

    @property
    def no_room(self) -> bool:
        return self.hold_id is None and self.skip_blocks < len(self.block_hashes)


def check_handle(engine: LLMEngine, prompt_token_ids: Sequence[int], block_hashes: Sequence[int],
                 num_tokens: int, block_size: int) -> None:
    """Raise ImportRefused unless the handle holds KV of this prompt in this worker's layout."""
    cfg = engine.config
    if block_size != cfg.block_size:
        raise ImportRefused(f"the KV handle has block_size {block_size} but this worker uses "
                            f"{cfg.block_size}; run prefill and decode workers with the same "
                            "--block-size")
    n = len(block_hashes)
    if num_tokens != n * block_size or num_tokens > len(prompt_token_ids):
        raise ImportRefused(f"the KV handle covers {num_tokens} tokens in {n} blocks of "
                            f"{block_size}; it must cover whole blocks of the prompt "
                            f"({len(prompt_token_ids)} tokens)")
    expected = hash_blocks(list(prompt_token_ids[:num_tokens]), cfg.hash_config)
    if list(block_hashes) != expected:
        raise ImportRefused("the KV handle's block hashes are not those of this prompt (other "
                            "tokens, or another --hash-seed); send the prompt the prefill "
                            "worker computed")


def plan_import(engine: LLMEngine, block_hashes: Sequence[int], owner: str) -> ImportPlan:
    """Skip what is cached here, reserve blocks for the rest (see the module docstring)."""
    hashes = tuple(block_hashes)
    kv = engine.kv
    skip = kv.cached_prefix_blocks(hashes)
    rest = len(hashes) - skip
    if rest == 0 or not kv.enable_prefix_caching:
        return ImportPlan(hashes, skip if kv.enable_prefix_caching else 0, None, ())
    reserved = kv.holds.reserve(owner, rest)
    if reserved is None:
        return ImportPlan(hashes, skip, None, ())
    hold_id, ids = reserved
    return ImportPlan(hashes, skip, hold_id, ids)


def commit_import(engine: LLMEngine, plan: ImportPlan,
                  token_ids: Sequence[int] | None = None) -> int:
    """The pulled blocks into the prefix cache; returns how many hold their hash now.
    A runner that keeps its own record of computed blocks (the mocker: ``import_blocks``)
    is told about them; it needs the prompt's ``token_ids``."""
    if plan.hold_id is None:
        return 0
    skip = plan.skip_blocks
    note = getattr(engine.runner, "import_blocks", None)
    if note is not None:
        if token_ids is None:
            raise ValueError("this runner records computed blocks: pass the prompt's token_ids")
        note(plan.dest_block_ids, token_ids, skip, engine.config.block_size)
    parent = plan.block_hashes[skip - 1] if skip else None
    return engine.kv.holds.commit(plan.hold_id, plan.block_hashes[skip:], parent)


def abandon_import(engine: LLMEngine, plan: ImportPlan) -> None:
    """A failed pull: the reserved blocks go back to free, unhashed."""
    if plan.hold_id is not None:
        engine.kv.holds.release(plan.hold_id)


__all__ = ["ImportPlan", "ImportRefused", "abandon_import", "check_handle", "commit_import",
           "plan_import"]
