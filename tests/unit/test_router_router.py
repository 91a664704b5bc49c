"""router.router: modes, registration checks, in-flight spreading and hit statistics."""

from __future__ import annotations

import random

import pytest

from kvcache.events import BlockStored, KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from router.cost import CostConfig
from router.router import make_router
from router.types import ApplyStatus, LoadReport, RouteRequest, RouterMode, WorkerInfo

CFG = BlockHashConfig(block_size=4, seed=7)
PROMPT = list(range(18))  # 4 full blocks + 2 tokens: 5 prompt blocks
OTHER = list(range(12)) + list(range(500, 506))  # shares PROMPT's first 3 blocks


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def router(mode: str, workers=("w0", "w1", "w2"), seed: int = 0, **kwargs):
    clock = Clock()
    # decode weight 1: the in-flight accounting below shows in the costs as whole blocks
    cost = kwargs.pop("cost_config", CostConfig(decode_weight=1.0))
    r = make_router(mode, CFG, cost, seed=seed, clock=clock, **kwargs)
    for w in workers:
        r.add_worker(WorkerInfo(w, CFG, capacity_blocks=100))
    return r, clock


def req(rid: str, tokens=PROMPT, out: int = 0) -> RouteRequest:
    return RouteRequest.from_tokens(rid, tokens, out)


def store_on(r, worker: str, seq: int, tokens) -> None:
    res = r.apply_events(worker, KvEventBatch(seq, 0.0, (BlockStored(
        tuple(hash_blocks(tokens, CFG)), None),)))
    assert res.status is ApplyStatus.APPLIED


def test_round_robin_order():
    r, _ = router("round_robin")
    assert [r.route(req(f"r{i}")).worker_id for i in range(5)] == ["w0", "w1", "w2", "w0", "w1"]
    r.remove_worker("w1")  # the turn counter goes on (5, 6, ...) over [w0, w2, w3]
    r.add_worker(WorkerInfo("w3", CFG, 100))
    assert [r.route(req(f"s{i}")).worker_id for i in range(4)] == ["w3", "w0", "w2", "w3"]
    assert r.route(req("t")).mode is RouterMode.ROUND_ROBIN


def test_random_follows_the_seeded_rng():
    r, _ = router("random", seed=11)
    rng = random.Random(11)
    assert [r.route(req(f"r{i}")).worker_id for i in range(12)] == \
        [rng.choice(["w0", "w1", "w2"]) for _ in range(12)]


def test_round_robin_reports_real_overlap_from_events():
    r, _ = router("round_robin")
    store_on(r, "w1", 0, PROMPT)
    d0, d1 = r.route(req("a")), r.route(req("b"))
    assert (d0.worker_id, d0.overlap_blocks, d1.worker_id, d1.overlap_blocks) == \
        ("w0", 0, "w1", 4)


def test_kv_picks_the_prefix_holder():
    r, _ = router("kv")
    store_on(r, "w2", 0, PROMPT)
    d = r.route(req("a"))
    assert (d.worker_id, d.overlap_blocks, d.prompt_blocks) == ("w2", 4, 4)
    assert (d.cost.uncached_blocks, d.cost.cost) == (1, 1.0)
    assert d.block_hashes == tuple(hash_blocks(PROMPT, CFG))
    # 3 shared blocks, but "a" is in flight on w2: 1 block to prefill, 5 to hold: 2 + 1 + 5 > 5
    d = r.route(req("b", OTHER))
    assert (d.worker_id, d.overlap_blocks, d.cost.cost) == ("w1", 0, 5.0)
    r.on_prefill_done("a")  # 2 + 5 > 5 still
    assert r.route(req("c", OTHER)).worker_id == "w0"
    for rid in "abc":
        r.on_finished(rid)
    d = r.route(req("d", OTHER))
    assert (d.worker_id, d.overlap_blocks, d.cost.cost) == ("w2", 3, 2.0)


def test_kv_skips_the_prefix_holder_when_busy():
    r, _ = router("kv")
    store_on(r, "w2", 0, PROMPT)
    r.apply_load(LoadReport("w2", 1.0, kv_blocks_used=95, kv_blocks_total=100))
    r.apply_load(LoadReport("w0", 1.0, active_prefill_tokens=8))  # 2 queued blocks
    d = r.route(req("a"))
    assert (d.worker_id, d.overlap_blocks, d.cost.cost) == ("w1", 0, 5.0)
    r.apply_load(LoadReport("w2", 2.0, kv_blocks_used=94, kv_blocks_total=100))
    assert r.route(req("b")).worker_id == "w2"


def test_simultaneous_identical_requests_spread():
    r, _ = router("kv", workers=("w0", "w1", "w2"), seed=3)
    chosen = [r.route(req(f"r{i}", out=8)).worker_id for i in range(3)]  # same instant
    assert sorted(chosen) == ["w0", "w1", "w2"]
    loads = {ld.worker_id: ld for ld in r.load_view.loads()}
    assert {w: (ld.queued_prefill_blocks, ld.decode_blocks) for w, ld in loads.items()} == \
        {w: (5, 7) for w in ("w0", "w1", "w2")}  # ceil(18/4) and ceil((18+8)/4)
    # once the first is done, it goes back to the least loaded
    r.on_finished("r0")
    assert r.route(req("r3")).worker_id == chosen[0]


def test_approx_ttl_expiry_exact():
    r, clock = router("approx", approx_ttl_s=10.0)
    first = r.route(req("a"))
    assert first.overlap_blocks == 0
    r.on_finished("a")
    clock.t = 9.999  # still predicted: same worker, all 4 blocks; refreshed until 19.999
    d = r.route(req("b"))
    assert (d.worker_id, d.overlap_blocks) == (first.worker_id, 4)
    r.on_finished("b")
    clock.t = 19.998
    d = r.route(req("c"))
    assert (d.worker_id, d.overlap_blocks) == (first.worker_id, 4)
    r.on_finished("c")
    clock.t = 19.998 + 10.0  # exactly the TTL after the last routing: gone
    d = r.route(req("d"))
    assert d.overlap_blocks == 0
    assert r.index.overlap(hash_blocks(PROMPT, CFG)).scores == {d.worker_id: 4}  # "d" itself


def test_approx_predicts_partial_prefixes_and_takes_no_events():
    r, _ = router("approx", approx_ttl_s=5.0)
    w = r.route(req("a")).worker_id
    r.on_finished("a")
    d = r.route(req("b", OTHER))
    assert (d.worker_id, d.overlap_blocks) == (w, 3)
    with pytest.raises(ValueError, match="takes no KV events"):
        r.apply_events(w, KvEventBatch(0, 0.0, ()))


def test_stats_achieved_vs_achievable():
    rr, _ = router("round_robin")
    kv, _ = router("kv")
    for r in (rr, kv):
        first = r.route(req("a"))
        store_on(r, first.worker_id, 0, PROMPT)
        r.on_finished("a")
        r.route(req("b", OTHER))
    s = rr.stats()  # "b" went to w1, which holds nothing; the shared cache had 3 blocks
    assert (s.requests, s.prompt_blocks, s.hit_blocks, s.achievable_hit_blocks) == (2, 8, 0, 3)
    s = kv.stats()  # "b" went where "a" was
    assert (s.requests, s.prompt_blocks, s.hit_blocks, s.achievable_hit_blocks) == (2, 8, 3, 3)
    assert (s.hit_rate, s.achievable_hit_rate) == (3 / 8, 3 / 8)


@pytest.mark.parametrize(
    "other, message",
    [
        (BlockHashConfig(block_size=8, seed=7),
         ("worker 'bad' uses block_size=8 but this router uses block_size=4; "
          "start both with the same --block-size")),
        (BlockHashConfig(block_size=4, seed=8),
         ("worker 'bad' uses hash seed 8 but this router uses 7; "
          "start both with the same --hash-seed")),
    ],
)
def test_mismatched_hash_config_is_refused(other, message):
    r, _ = router("kv")
    with pytest.raises(ValueError) as e:
        r.add_worker(WorkerInfo("bad", other, 100))
    assert str(e.value) == message
    assert r.workers == ("w0", "w1", "w2")


def test_gap_then_snapshot_through_the_router():
    r, _ = router("kv")
    store_on(r, "w0", 0, OTHER)
    gap = r.apply_events("w0", KvEventBatch(3, 0.0, ()))
    assert (gap.status, gap.missing) == (ApplyStatus.GAP, range(1, 3))
    r.load_snapshot("w0", [BlockStored(tuple(hash_blocks(PROMPT, CFG)), None)], 2)
    assert r.apply_events("w0", KvEventBatch(3, 0.0, ())).status is ApplyStatus.APPLIED
    assert r.route(req("a")).overlap_blocks == 4


def test_no_workers_and_caller_bugs():
    r, _ = router("kv", workers=())
    assert r.route(req("a")) is None
    r.add_worker(WorkerInfo("w0", CFG, 10))
    r.route(req("a"))
    with pytest.raises(ValueError, match="already in flight"):
        r.route(req("a"))
    with pytest.raises(ValueError, match="already registered"):
        r.add_worker(WorkerInfo("w0", CFG, 10))
    with pytest.raises(ValueError, match="expected 4"):
        r.route(RouteRequest("b", 18, block_hashes=(1, 2, 3)))
    with pytest.raises(ValueError, match="unknown router mode 'fastest'"):
        make_router("fastest", CFG)
    assert r.remove_worker("w0") and not r.remove_worker("w0")
    assert r.route(req("c")) is None


def test_precomputed_hashes_route_like_tokens():
    r, _ = router("kv")
    store_on(r, "w1", 0, PROMPT)
    d = r.route(RouteRequest("a", 18, block_hashes=tuple(hash_blocks(PROMPT, CFG))))
    assert (d.worker_id, d.overlap_blocks) == ("w1", 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_len": 0, "token_ids": ()}, "prompt_len must be an integer >= 1"),
        ({"prompt_len": 3}, "exactly one of token_ids or block_hashes"),
        ({"prompt_len": 3, "token_ids": (1, 2), "block_hashes": ()}, "exactly one"),
        ({"prompt_len": 3, "token_ids": (1, 2)}, "prompt_len=3 but 2 token ids"),
        ({"prompt_len": 2, "token_ids": (1, 2), "expected_output_tokens": -1},
         "expected_output_tokens must be an integer >= 0"),
    ],
)
def test_route_request_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouteRequest("r", **kwargs)
