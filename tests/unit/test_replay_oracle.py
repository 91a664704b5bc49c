"""The oracle reuse (an infinite KV cache shared by all workers): exact hits per request, and
agreement with what a real engine caches when it never evicts and never overlaps."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache.hashing import BlockHashConfig, hash_blocks
from orchestrator.replay.config import ReplayConfig
from orchestrator.replay.oracle import OracleCache
from orchestrator.replay.simulator import replay_offline
from router.trace import TraceRequest


def chain(*tokens: int) -> tuple[int, ...]:
    """The real chained block hashes of a prompt (block size 4)."""
    return tuple(hash_blocks(list(tokens), BlockHashConfig(4, 0)))


def test_exact_hits_in_arrival_order():
    o = OracleCache(block_size=4)
    a, b, c, x = (1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)
    # (prompt tokens, expected hit blocks)
    steps = [
        ((*a, *b, *c, 99), 0),  # nothing seen yet
        ((*a, *b, *x), 2),  # leading run a, b
        ((*a, *b, *c), 2),  # all 3 seen, but the last token's block is computed: (12-1)//4
        ((*a, *b, *c, 7), 3),  # a partial tail: all 3 full blocks hit
        ((*x, *b), 0),  # only a leading run counts: b after x is another block than b after a
        ((*a, *b, *x, *c), 3),  # a, b, x seen (request 2); c after them is new
        ((1, 2, 3), 0),  # shorter than a block
    ]
    for tokens, want in steps:
        assert o.add(chain(*tokens), len(tokens)) == want
    prompt = sum(len(t) for t, _ in steps)
    assert (o.prompt_tokens, o.hit_tokens) == (prompt, 4 * 10)
    assert o.reuse == 40 / prompt


def test_empty_cache_reuse_is_zero_and_bad_input_is_refused():
    o = OracleCache(16)
    assert o.reuse == 0.0
    with pytest.raises(ValueError, match="2 block hashes do not describe a prompt of 16 tokens "
                                         "at block_size 16"):
        o.add((1, 2), 16)
    with pytest.raises(ValueError, match="do not describe a prompt of 0 tokens"):
        o.add((), 0)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        OracleCache(0)


def test_one_worker_that_never_evicts_reaches_exactly_the_oracle():
    # Requests far apart (each finishes before the next arrives) on one worker with room for
    # everything: every block any earlier request computed is still cached, so the engines'
    # cached tokens equal the oracle's hits.
    trace = [
        TraceRequest(0.0, 700, 2, (1, 2)),
        TraceRequest(10_000.0, 900, 2, (1, 2)),  # 1 and 2 again: 700 // 64 = 10 full blocks hit
        TraceRequest(20_000.0, 300, 1, (1,)),  # inside id 1: (300 - 1) // 64 = 4 blocks
        TraceRequest(30_000.0, 1024, 3, (3, 1)),  # new first id: nothing
        TraceRequest(40_000.0, 1000, 2, (3, 1)),  # 15 blocks: ids 3, 1 give 1000 // 64 = 15
    ]
    cfg = ReplayConfig(trace=Path("unused"), workers=1, num_blocks=512)
    report = replay_offline(cfg, trace)
    assert report.completed == 5 and report.failed == 0
    assert report.cached_tokens == report.oracle_hit_tokens == 64 * (10 + 4 + 15)
    assert report.prefix_reuse == report.oracle_reuse == 64 * 29 / (700 + 900 + 300 + 1024 + 1000)
    assert report.router_stats.hit_blocks == 10 + 4 + 15
