"""router.disagg: the local / remote prefill decision (a table of exact cases), the choice of
the decode and prefill workers, the in-flight accounting through a request's life, round robin
and approx pools, and the config's validation."""

from __future__ import annotations

import pytest

from kvcache.events import BlockStored, KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_blocks
from router.cost import CostConfig
from router.disagg import (
    PREFILL_KEY_SUFFIX,
    DisaggConfig,
    DisaggReason,
    DisaggRouter,
    LoadChange,
    PoolRole,
    plan_prefill,
)
from router.router import make_router
from router.types import LoadReport, RouteRequest, WorkerInfo, WorkerLoad

BS = 4
CFG = BlockHashConfig(block_size=BS, seed=3)
PROMPT = tuple(range(40))  # 10 full blocks
P = PREFILL_KEY_SUFFIX


def load(wid: str, prefill: int = 0, decode: int = 0, used: int = 0, total: int = 100
         ) -> WorkerLoad:
    return WorkerLoad(wid, prefill, decode, used, total, waiting=0, running=0)


L, R = DisaggReason, DisaggReason.LONG_PREFILL
# (prompt_len, decode overlap blocks, prefill loads, config) -> (reason, uncached, queue/worker)
PLAN_CASES = [
    # no prefill worker: local whatever the length
    (4000, 0, [], DisaggConfig(), L.NO_PREFILL_WORKER, 4000, 0.0),
    # 513 uncached tokens > 512: remote
    (513, 0, [load("p0")], DisaggConfig(), R, 513, 0.0),
    # exactly the threshold: local
    (512, 0, [load("p0")], DisaggConfig(), L.SHORT_PREFILL, 512, 0.0),
    # long prompt, but the decode worker holds all but 12 tokens of it
    (1000, 247, [load("p0")], DisaggConfig(), L.SHORT_PREFILL, 12, 0.0),
    # a held prefix beyond the prompt never makes the uncached count negative
    (8, 5, [load("p0")], DisaggConfig(max_local_prefill_tokens=0), L.SHORT_PREFILL, 0, 0.0),
    # threshold 0: any uncached token goes remote
    (9, 2, [load("p0")], DisaggConfig(max_local_prefill_tokens=0), R, 1, 0.0),
    # pool queue: (3000 + 1000) blocks * 4 / 2 workers = 8000 tokens > 7999: busy
    (2000, 0, [load("p0", prefill=3000), load("p1", prefill=1000)],
     DisaggConfig(max_prefill_queue_tokens=7999), L.PREFILL_BUSY, 2000, 8000.0),
    # ... 8000 is not above 8000: remote
    (2000, 0, [load("p0", prefill=3000), load("p1", prefill=1000)],
     DisaggConfig(max_prefill_queue_tokens=8000), R, 2000, 8000.0),
    # queue check off
    (2000, 0, [load("p0", prefill=10**6)], DisaggConfig(max_prefill_queue_tokens=None), R,
     2000, 4e6),
    # every prefill worker busy by KV usage (cost config's 0.95): local
    (2000, 0, [load("p0", used=96), load("p1", used=99)], DisaggConfig(), L.PREFILL_BUSY, 2000,
     0.0),
    # one of them is not: remote
    (2000, 0, [load("p0", used=96), load("p1", used=94)], DisaggConfig(), R, 2000, 0.0),
    # short wins over busy (a short prompt is local for that reason)
    (100, 0, [load("p0", used=99)], DisaggConfig(), L.SHORT_PREFILL, 100, 0.0),
]


@pytest.mark.parametrize(("prompt_len", "overlap", "loads", "config", "reason", "uncached",
                          "queued"), PLAN_CASES)
def test_plan_prefill_table(prompt_len, overlap, loads, config, reason, uncached, queued):
    plan = plan_prefill(prompt_len, BS, overlap, loads, CostConfig(), config)
    assert (plan.reason, plan.uncached_tokens, plan.queued_tokens_per_prefill_worker) == \
        (reason, uncached, queued)
    assert plan.remote == (reason is R)
    assert reason.choice == ("remote" if reason is R else "local")


def test_plan_prefill_uses_the_cost_configs_busy_prefill_threshold():
    cost = CostConfig(busy_prefill_blocks=10)
    loads = [load("p0", prefill=10), load("p1", prefill=12)]
    assert plan_prefill(2000, BS, 0, loads, cost, DisaggConfig()).reason is L.PREFILL_BUSY
    loads[1] = load("p1", prefill=9)
    assert plan_prefill(2000, BS, 0, loads, cost, DisaggConfig()).reason is R


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_local_prefill_tokens": -1}, "max_local_prefill_tokens must be an integer >= 0"),
    ({"max_local_prefill_tokens": 1.5}, "max_local_prefill_tokens must be an integer >= 0"),
    ({"max_local_prefill_tokens": True}, "max_local_prefill_tokens must be an integer >= 0"),
    ({"max_prefill_queue_tokens": 0}, "max_prefill_queue_tokens must be an integer >= 1, or N"),
    ({"max_prefill_queue_tokens": "8k"}, "max_prefill_queue_tokens must be an integer >= 1"),
])
def test_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DisaggConfig(**kwargs)


def test_defaults_are_the_documented_ones():
    c = DisaggConfig()
    assert (c.max_local_prefill_tokens, c.max_prefill_queue_tokens) == (512, 16384)
    with pytest.raises(TypeError, match="router must be a router.Router"):
        DisaggRouter(object())
    with pytest.raises(TypeError, match="config must be a DisaggConfig"):
        DisaggRouter(make_router("kv", CFG), {"max_local_prefill_tokens": 0})


# ---------------------------------------------------------------- the stateful router


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def cluster(mode: str = "kv", config: DisaggConfig | None = None, prefill=("p0", "p1"),
            decode=("d0", "d1"), cost: CostConfig | None = None):
    clock = Clock()
    router = make_router(mode, CFG, cost or CostConfig(), seed=0, clock=clock)
    d = DisaggRouter(router, config or DisaggConfig(max_local_prefill_tokens=8), clock=clock)
    for w in prefill:
        d.add_worker(WorkerInfo(w, CFG, 100), "prefill")
    for w in decode:
        d.add_worker(WorkerInfo(w, CFG, 100), PoolRole.DECODE)
    return d, clock


def store(d: DisaggRouter, worker: str, seq: int, tokens) -> None:
    d.router.apply_events(worker, KvEventBatch(seq, 0.0, (BlockStored(
        tuple(hash_blocks(tokens, CFG)), None),)))


def req(rid: str, tokens=PROMPT, out: int = 0) -> RouteRequest:
    return RouteRequest.from_tokens(rid, tokens, out)


def loads(d: DisaggRouter) -> dict[str, tuple[int, int, int]]:
    """worker -> (queued prefill blocks, decode blocks, waiting)"""
    return {ld.worker_id: (ld.queued_prefill_blocks, ld.decode_blocks, ld.waiting)
            for ld in d.router.load_view.loads()}


def test_pools_and_roles():
    d, _ = cluster(decode=("d0",))
    d.add_worker(WorkerInfo("a0", CFG, 100), "aggregated")
    assert d.pool(decode=True) == ("d0", "a0") and d.pool(decode=False) == ("p0", "p1")
    assert d.role("a0") is PoolRole.BOTH and d.role("zz") is None
    with pytest.raises(ValueError, match="unknown role 'mixed'; use one of"):
        d.add_worker(WorkerInfo("x", CFG, 100), "mixed")
    assert "x" not in d.router.workers
    with pytest.raises(ValueError, match="hash seed 9 but this router uses 3"):
        d.add_worker(WorkerInfo("y", BlockHashConfig(block_size=BS, seed=9), 100), "decode")
    assert d.remove_worker("p1") and not d.remove_worker("p1")
    assert d.router.workers == ("p0", "d0", "a0")


def test_a_remote_request_through_its_whole_life():
    d, _ = cluster()
    store(d, "p1", 0, PROMPT[:24])  # p1 holds 6 of the 10 blocks
    store(d, "d0", 0, PROMPT[:4])  # d0 holds 1: 36 tokens uncached there, > 8
    decision, changes = d.route(req("r1", out=8))
    assert (decision.decode_worker, decision.prefill_worker, decision.reason) == ("d0", "p1", R)
    assert (decision.plan.uncached_tokens, decision.prefill.uncached_blocks) == (36, 4)
    assert decision.decode.cost == 9.0 and decision.prefill.cost == 4.0
    assert changes == [LoadChange("routed", "r1" + P, "p1", 4, 10),
                       LoadChange("routed", "r1", "d0", 0, 12)]
    assert loads(d) == {"p0": (0, 0, 0), "p1": (4, 10, 1), "d0": (0, 12, 1), "d1": (0, 0, 0)}
    assert d.on_first_token("r1") == [LoadChange("prefill_done", "r1" + P)]
    assert loads(d)["p1"] == (0, 10, 0)
    assert d.on_decode_started("r1") == [LoadChange("prefill_done", "r1"),
                                         LoadChange("finished", "r1" + P)]
    assert d.on_decode_started("r1") == []  # once
    assert loads(d) == {"p0": (0, 0, 0), "p1": (0, 0, 0), "d0": (0, 12, 0), "d1": (0, 0, 0)}
    assert d.on_finished("r1") == [LoadChange("finished", "r1")]
    assert d.on_finished("r1") == [] and not d.in_flight("r1")
    assert all(v == (0, 0, 0) for v in loads(d).values())
    stats = d.stats()
    assert stats.decisions[R] == 1 and sum(stats.decisions.values()) == 1
    assert (stats.routing.requests, stats.routing.prompt_blocks, stats.routing.hit_blocks) == \
        (1, 10, 6)


def test_decode_choice_follows_what_the_decode_worker_holds_and_its_load():
    d, _ = cluster()
    store(d, "d1", 0, PROMPT[:36])  # d1 holds 9 blocks: 4 tokens uncached <= 8: local on d1
    decision, changes = d.route(req("a"))
    assert (decision.decode_worker, decision.prefill_worker, decision.reason) == \
        ("d1", None, L.SHORT_PREFILL)
    assert decision.plan.uncached_tokens == 4
    assert changes == [LoadChange("routed", "a", "d1", 1, 10)]
    assert d.on_first_token("a") == [LoadChange("prefill_done", "a")]
    assert d.on_decode_started("a") == []  # local: nothing to do
    # decode load: d1 now holds 10 decode blocks, so a fresh prompt goes to d0; p1 has a
    # block of prefill queued, so p0 prefills it
    d.router.apply_load(LoadReport("p1", 1.0, active_prefill_tokens=3, kv_blocks_total=100))
    other = tuple(range(100, 140))
    decision, _ = d.route(req("b", other))
    assert decision.decode_worker == "d0" and decision.prefill_worker == "p0"
    # what d1 holds outweighs its load: 1 uncached + 10 decode blocks against d0's 10 + 10
    decision, _ = d.route(req("c"))
    assert decision.decode_worker == "d1" and decision.reason is L.SHORT_PREFILL


def test_prefill_choice_weighs_cache_and_prefill_queue_but_not_decode_blocks():
    d, _ = cluster(config=DisaggConfig(max_local_prefill_tokens=0))
    store(d, "p0", 0, PROMPT[:20])  # p0 holds 5 blocks
    d.router.apply_load(LoadReport("p0", 1.0, kv_blocks_used=50, kv_blocks_total=100,
                                   active_decode_blocks=50))  # pinned blocks: not a cost
    decision, _ = d.route(req("a"))
    assert decision.prefill_worker == "p0" and decision.prefill.cost == 5.0
    # a report covers a's entry: 4 blocks queued; 5 uncached + 4 = 9 still beats p1's 10
    d.router.apply_load(LoadReport("p0", 2.0, active_prefill_tokens=4 * 4,
                                   kv_blocks_total=100))
    decision, _ = d.route(req("b"))
    assert decision.prefill_worker == "p0" and decision.prefill.cost == 9.0


def test_a_busy_prefill_pool_keeps_the_prefill_local():
    d, _ = cluster(config=DisaggConfig(max_local_prefill_tokens=0, max_prefill_queue_tokens=40))
    decision, changes = d.route(req("a"))  # queues 10 blocks (40 tokens) on one prefill worker
    assert decision.reason is R
    decision, _ = d.route(req("b", tuple(range(200, 240))))  # 20 tokens per worker: not busy
    assert decision.reason is R and decision.plan.queued_tokens_per_prefill_worker == 20.0
    decision, changes = d.route(req("c", tuple(range(300, 340))))  # 40 each: not above 40
    assert decision.reason is R
    decision, changes = d.route(req("d", tuple(range(400, 440))))  # 60 > 40: busy
    assert (decision.reason, decision.prefill_worker) == (L.PREFILL_BUSY, None)
    assert decision.plan.queued_tokens_per_prefill_worker == 60.0
    assert changes == [LoadChange("routed", "d", decision.decode_worker, 10, 10)]


def test_a_failed_prefill_turns_into_a_local_prefill_entry():
    d, _ = cluster(config=DisaggConfig(max_local_prefill_tokens=0))
    store(d, "d0", 0, PROMPT[:8])  # d0 holds 2 blocks: 8 uncached to compute after a failure
    store(d, "p0", 0, PROMPT[:4])
    decision, _ = d.route(req("f"))
    assert (decision.decode_worker, decision.prefill_worker) == ("d0", "p0")
    assert d.on_prefill_failed("f") == [LoadChange("finished", "f" + P),
                                        LoadChange("finished", "f"),
                                        LoadChange("routed", "f", "d0", 8, 10)]
    assert loads(d)["p0"] == (0, 0, 0) and loads(d)["d0"] == (8, 10, 1)
    assert d.on_prefill_failed("f") == []  # already local
    assert d.on_first_token("f") == [LoadChange("prefill_done", "f")]
    assert d.on_finished("f") == [LoadChange("finished", "f")]
    assert all(v == (0, 0, 0) for v in loads(d).values())
    assert d.stats().decisions[L.PREFILL_FAILED] == 1


def test_cancelled_before_decode_finishes_both_entries_and_a_retry_replaces_them():
    d, _ = cluster(config=DisaggConfig(max_local_prefill_tokens=0))
    d.route(req("x"))
    assert d.on_finished("x") == [LoadChange("finished", "x"), LoadChange("finished", "x" + P)]
    d.route(req("y"))
    decision, changes = d.route(req("y"), decode_candidates=["d1"])  # a retry elsewhere
    assert changes[:2] == [LoadChange("finished", "y"), LoadChange("finished", "y" + P)]
    assert decision.decode_worker == "d1"
    assert sum(v[2] for v in loads(d).values()) == 2  # y on a prefill worker and on d1


def test_candidates_restrict_each_pool():
    d, _ = cluster(config=DisaggConfig(max_local_prefill_tokens=0))
    store(d, "p0", 0, PROMPT)
    store(d, "d0", 0, PROMPT[:4])
    decision, _ = d.route(req("a"), decode_candidates=["d1", "p0", "ghost"],
                          prefill_candidates=["p1", "d0"])
    assert (decision.decode_worker, decision.prefill_worker) == ("d1", "p1")
    decision, _ = d.route(req("b"), prefill_candidates=[])
    assert decision.reason is L.NO_PREFILL_WORKER
    assert d.route(req("c"), decode_candidates=["p0"]) is None
    assert not d.in_flight("c")


def test_round_robin_pools_take_turns_independently():
    d, _ = cluster("round_robin", DisaggConfig(max_local_prefill_tokens=0),
                   prefill=("p0", "p1", "p2"))
    picks = [d.route(req(f"r{i}"))[0] for i in range(4)]
    assert [(x.decode_worker, x.prefill_worker) for x in picks] == \
        [("d0", "p0"), ("d1", "p1"), ("d0", "p2"), ("d1", "p0")]


def test_approx_predicts_that_the_decode_worker_holds_what_it_was_sent():
    d, clock = cluster("approx", DisaggConfig(max_local_prefill_tokens=8))
    decision, _ = d.route(req("t1"))  # remote: nothing predicted yet
    assert decision.reason is R
    first = decision.decode_worker
    d.on_finished("t1")
    turn2 = PROMPT + (7, 7, 7)  # the next turn: 3 new tokens past the held 10 blocks
    decision, _ = d.route(req("t2", turn2))
    assert (decision.decode_worker, decision.reason) == (first, L.SHORT_PREFILL)
    assert decision.plan.uncached_tokens == 3
    d.on_finished("t2")
    clock.t = 121.0  # past the TTL: forgotten
    decision, _ = d.route(req("t3", turn2))
    assert decision.reason is R


def test_given_block_hashes_must_match_the_prompt_length():
    d, _ = cluster()
    with pytest.raises(ValueError, match="3 block hashes for prompt_len=40 at block_size=4; "
                                         "expected 10"):
        d.route(RouteRequest("h", 40, block_hashes=(1, 2, 3)))
