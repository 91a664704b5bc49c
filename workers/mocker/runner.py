"""The mocker runner: the Runner protocol with a timing model instead of a model.

The engine, scheduler, KV cache manager and block pool are the real ones; only the forward
pass is replaced. For each :class:`~workers.engine.types.ScheduledBatch`, :meth:`execute`

1. "computes the KV" of every scheduled token: it records, per physical block named by the
   sequence's block table, what the real cache would hold there, in a compact form: for a
   full block the chained hash of its content (``kvcache.hashing.hash_block`` with the
   mocker's seed, chained on the block before it), for a partly filled block its parent hash
   and its tokens so far. A pass that starts inside a block continues that block's record; a
   pass that starts after a prefix-cache hit reads the hit blocks' records. A record that is
   missing or does not line up (the block table points at a block nobody computed) is a
   scheduler or KV-manager bug and raises RuntimeError;
2. samples, for every sequence with ``sample`` set, a fake next token that is a pure function
   of the sampled position and all the token ids before it (a blake2b mix of the seed, the
   parent block hash, the tokens of the last block and the position), in ``[0, vocab_size)``
   and never one of ``avoid_token_ids`` (pass the EOS ids there for runs that must reach
   ``max_tokens``). Sampling parameters are ignored: the mocker is deterministic. So chunked
   prefill, preemption and recompute, and prefix-cache hits give the same tokens as a plain
   run, and a wrong block table gives different ones;
3. advances its clock by the modelled pass time (:class:`~workers.mocker.timing.TimingModel`)
   and returns it as ``duration_s``.

Memory: one small record per physical block ever written (bounded by the number of blocks).
Sequences are processed in batch order, so a sequence may hit blocks that an earlier
sequence of the same batch computes in this very pass (as in a real forward pass, where every
token's KV is written before attention reads it).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from kvcache.hashing import hash_block
from workers.engine.types import RunnerOutput, ScheduledBatch, ScheduledSeq
from workers.mocker.clock import Clock, VirtualClock
from workers.mocker.timing import TimingModel

_HEADER = struct.Struct("<QQQ")


class MockerRunner:
    """A Runner whose passes take modelled time and sample deterministic fake tokens."""

    def __init__(self, vocab_size: int, max_model_len: int, timing: TimingModel | None = None,
                 clock: Clock | None = None, seed: int = 0,
                 avoid_token_ids: Iterable[int] = ()) -> None:
        for name, value in (("vocab_size", vocab_size), ("max_model_len", max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        avoid = frozenset(avoid_token_ids)
        if any(not 0 <= t < vocab_size for t in avoid if isinstance(t, int)) or \
                any(not isinstance(t, int) for t in avoid):
            raise ValueError(f"avoid_token_ids must be token ids in [0, {vocab_size})")
        if len(avoid) >= vocab_size:
            raise ValueError("avoid_token_ids leaves no token to sample; avoid fewer ids")
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.timing = timing if timing is not None else TimingModel()
        self.clock: Clock = clock if clock is not None else VirtualClock()
        self.seed = seed
        self.avoid_token_ids = avoid
        self._full: dict[int, int] = {}  # block id -> chained hash of its full content
        self._partial: dict[int, tuple[int | None, list[int]]] = {}  # id -> (parent, tokens)
        self.num_passes = 0

    def now(self) -> float:
        return self.clock.now()

    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        sampled: dict[str, int] = {}
        for seq in batch.seqs:
            parent, tokens = self._write(seq, batch.block_size)
            if seq.sample:
                pos = seq.start_pos + len(seq.token_ids) - 1
                sampled[seq.request_id] = self._sample(parent, tokens, pos)
        duration = self.timing.batch_seconds(batch)
        self.clock.advance(duration)
        self.num_passes += 1
        return RunnerOutput(sampled=sampled, duration_s=duration)

    # ---------------------------------------------------------------- internals

    def _write(self, seq: ScheduledSeq, bs: int) -> tuple[int | None, list[int]]:
        """Record the KV of the pass's tokens; return the last written block's record."""
        toks, table, start = seq.token_ids, seq.block_table, seq.start_pos
        n = len(toks)
        if n == 0:
            raise RuntimeError(f"request {seq.request_id!r} was scheduled with no tokens")
        end = start + n
        if end > self.max_model_len:
            raise RuntimeError(f"request {seq.request_id!r} reaches position {end - 1}, beyond "
                               f"max_model_len {self.max_model_len}")
        if end > len(table) * bs:
            raise RuntimeError(f"request {seq.request_id!r}: {len(table)} blocks of {bs} cannot "
                               f"hold {end} tokens")
        parent: int | None = None
        tokens: list[int] = []
        i = 0
        while i < n:
            p = start + i
            k, off = divmod(p, bs)
            block_id = table[k]
            take = min(bs - off, n - i)
            if off == 0:
                parent = self._parent(seq, k)
                tokens = list(toks[i:i + take])
                self._full.pop(block_id, None)
            else:
                record = self._partial.get(block_id)
                if record is None or len(record[1]) != off:
                    raise RuntimeError(
                        f"request {seq.request_id!r}: block {block_id} does not hold the "
                        f"{off} tokens before position {p}; its block table is wrong")
                parent, tokens = record
                tokens.extend(toks[i:i + take])
            if len(tokens) == bs:
                self._partial.pop(block_id, None)
                self._full[block_id] = hash_block(parent, tokens, self.seed)
            else:
                self._partial[block_id] = (parent, tokens)
            i += take
        return parent, tokens

    def import_blocks(self, block_ids, token_ids, first_block: int, block_size: int) -> None:
        """Blocks ``first_block ..`` of a sequence of ``token_ids`` arrived from another worker
        (disaggregation: ``workers.engine.kv_import``): record them in ``block_ids`` as if
        computed here (the records are a function of the tokens alone)."""
        bs = block_size
        parent: int | None = None
        for i in range(first_block + len(block_ids)):
            parent = hash_block(parent, list(token_ids[i * bs:(i + 1) * bs]), self.seed)
            if i >= first_block:
                block_id = block_ids[i - first_block]
                self._partial.pop(block_id, None)
                self._full[block_id] = parent

    def _parent(self, seq: ScheduledSeq, k: int) -> int | None:
        if k == 0:
            return None
        block_id = seq.block_table[k - 1]
        h = self._full.get(block_id)
        if h is None:
            raise RuntimeError(
                f"request {seq.request_id!r}: block {block_id} (block {k - 1} of its table) "
                "holds no computed KV; its block table is wrong")
        return h

    def _sample(self, parent: int | None, tokens: list[int], pos: int) -> int:
        data = _HEADER.pack(self.seed, parent or 0, pos) + struct.pack(f"<{len(tokens)}I", *tokens)
        digest = hashlib.blake2b(data, digest_size=8, person=b"ferry-mocker").digest()
        token = int.from_bytes(digest, "little") % self.vocab_size
        while token in self.avoid_token_ids:
            token = (token + 1) % self.vocab_size
        return token


__all__ = ["MockerRunner"]
