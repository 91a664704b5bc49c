"""router.cost: exact choices for tables of (overlap, load) cases, ties, busy, temperature."""

from __future__ import annotations

import math
import random

import pytest

from router.cost import CostConfig, choose_worker, softmax_weights, worker_cost
from router.types import WorkerLoad


def load(wid: str, prefill: int = 0, decode: int = 0, used: int = 0, total: int = 100
         ) -> WorkerLoad:
    return WorkerLoad(wid, prefill, decode, used, total, waiting=0, running=0)


class FixedRandom(random.Random):
    """A real Random whose uniform draw is fixed, to hit exact softmax buckets."""

    def __init__(self, x: float) -> None:
        super().__init__(0)
        self.x = x

    def random(self) -> float:
        return self.x


# (prompt_blocks, overlaps, loads, config, expected worker, expected cost)
CASES = [
    # the prefix holder wins when idle
    (10, {"w0": 8}, [load("w0"), load("w1")], CostConfig(), "w0", 2.0),
    # queued prefill outweighs the cache: 2 + 20 > 10
    (10, {"w0": 8}, [load("w0", prefill=20), load("w1")], CostConfig(), "w1", 10.0),
    # decode blocks count too, a tenth of a prefill block each: 2 + 0.1 * 90 > 10
    (10, {"w0": 8}, [load("w0", decode=90), load("w1")], CostConfig(), "w1", 10.0),
    # ... but far less than queued prefill: 2 + 0.1 * 70 < 10
    (10, {"w0": 8}, [load("w0", decode=70), load("w1")], CostConfig(), "w0", 9.0),
    # at decode weight 1, as much as prefill: 2 + 9 > 10
    (10, {"w0": 8}, [load("w0", decode=9), load("w1")], CostConfig(decode_weight=1.0), "w1",
     10.0),
    # ... and at 0.5: 2 + 0.5 * 9 < 10
    (10, {"w0": 8}, [load("w0", decode=9), load("w1")], CostConfig(decode_weight=0.5), "w0",
     6.5),
    # a heavier prefill weight favours the cache: 2*(2+3) < 2*10
    (10, {"w0": 8}, [load("w0", prefill=3), load("w1")], CostConfig(prefill_weight=2.0), "w0",
     10.0),
    # the holder is busy (KV usage 0.96 >= 0.95): skipped although cheapest
    (10, {"w0": 8}, [load("w0", used=96), load("w1", prefill=5)], CostConfig(), "w1", 15.0),
    # just under the threshold: not busy
    (10, {"w0": 8}, [load("w0", used=94), load("w1", prefill=5)], CostConfig(), "w0", 2.0),
    # KV usage check off
    (10, {"w0": 8}, [load("w0", used=100), load("w1")], CostConfig(busy_kv_usage=None), "w0",
     2.0),
    # queued prefill threshold: w0 has 4 >= 4 queued blocks
    (10, {"w0": 8}, [load("w0", prefill=4), load("w1", prefill=1)],
     CostConfig(busy_prefill_blocks=4), "w1", 11.0),
    # all busy: the least costly anyway
    (10, {"w1": 3}, [load("w0", used=99), load("w1", used=98), load("w2", used=97)],
     CostConfig(), "w1", 7.0),
    # overlap beyond the prompt's blocks never makes the cost negative
    (2, {"w0": 2}, [load("w0"), load("w1")], CostConfig(), "w0", 0.0),
    # several partial overlaps: 10-6+1 = 5 beats 10-4 = 6 and 10-0 = 10
    (10, {"w0": 4, "w1": 6, "w2": 0}, [load("w0"), load("w1", prefill=1), load("w2")],
     CostConfig(), "w1", 5.0),
]


@pytest.mark.parametrize("prompt_blocks, overlaps, loads, config, expected, cost", CASES)
def test_choices(prompt_blocks, overlaps, loads, config, expected, cost):
    choice = choose_worker(prompt_blocks, overlaps, loads, config, random.Random(0))
    assert (choice.chosen.worker_id, choice.chosen.cost) == (expected, cost)
    by_id = {ld.worker_id: ld for ld in loads}
    assert choice.chosen == worker_cost(prompt_blocks, overlaps.get(expected, 0),
                                        by_id[expected], config)


def test_breakdown_fields():
    c = worker_cost(10, 7, load("w", prefill=2, decode=5, used=40, total=80),
                    CostConfig(prefill_weight=3.0))
    assert (c.overlap_blocks, c.uncached_blocks, c.queued_prefill_blocks, c.decode_blocks,
            c.kv_usage, c.busy, c.cost) == (7, 3, 2, 5, 0.5, False, 3.0 * (3 + 2) + 0.1 * 5)


def test_all_busy_is_flagged():
    loads = [load("w0", used=99), load("w1", used=100)]
    choice = choose_worker(4, {}, loads, CostConfig(), random.Random(0))
    assert (choice.all_busy, choice.num_candidates, choice.chosen.busy) == (True, 2, True)
    choice = choose_worker(4, {}, [load("w0", used=99), load("w1")], CostConfig(),
                           random.Random(0))
    assert (choice.all_busy, choice.num_candidates, choice.chosen.worker_id) == (False, 1, "w1")


def test_ties_are_broken_by_the_seeded_rng():
    loads = [load("w0"), load("w1", prefill=1), load("w2")]  # w0 and w2 tie at cost 4
    picks = []
    for seed in range(40):
        got = choose_worker(4, {}, loads, CostConfig(), random.Random(seed)).chosen.worker_id
        assert got == random.Random(seed).choice(["w0", "w2"])
        picks.append(got)
    assert set(picks) == {"w0", "w2"}


def test_no_tie_uses_no_randomness():
    rng = random.Random(5)
    state = rng.getstate()
    choose_worker(4, {"w1": 1}, [load("w0"), load("w1")], CostConfig(), rng)
    assert rng.getstate() == state


def test_softmax_weights_exact():
    e = math.exp(-1.0)
    assert softmax_weights([0.0, 1.0], 1.0) == pytest.approx([1 / (1 + e), e / (1 + e)])
    # relative to the spread: the same weights at any scale
    assert softmax_weights([10.0, 30.0], 1.0) == pytest.approx([1 / (1 + e), e / (1 + e)])
    assert softmax_weights([3.0, 3.0, 3.0], 0.5) == [1 / 3] * 3
    e2 = math.exp(-2.0)
    assert softmax_weights([0.0, 5.0, 10.0], 1.0) == pytest.approx(
        [1 / (1 + math.exp(-0.5) + e), math.exp(-0.5) / (1 + math.exp(-0.5) + e),
         e / (1 + math.exp(-0.5) + e)])
    assert softmax_weights([0.0, 1.0], 0.5)[1] == pytest.approx(e2 / (1 + e2))
    with pytest.raises(ValueError, match="temperature > 0"):
        softmax_weights([1.0], 0.0)


@pytest.mark.parametrize("draw, expected", [(0.0, "w0"), (0.73, "w0"), (0.74, "w1"),
                                            (0.999, "w1")])
def test_temperature_samples_by_weight(draw, expected):
    # costs 6 (w0) and 10 (w1): weights 1/(1+e^-1) = 0.7311 and 0.2689
    loads = [load("w0"), load("w1")]
    cfg = CostConfig(temperature=1.0)
    assert choose_worker(10, {"w0": 4}, loads, cfg, FixedRandom(draw)).chosen.worker_id == \
        expected


def test_temperature_never_samples_a_busy_worker():
    loads = [load("w0", used=99), load("w1", prefill=50), load("w2", prefill=60)]
    cfg = CostConfig(temperature=5.0)
    picks = {choose_worker(10, {"w0": 10}, loads, cfg, random.Random(s)).chosen.worker_id
             for s in range(60)}
    assert picks == {"w1", "w2"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prefill_weight": -1.0}, "prefill_weight must be a finite number >= 0"),
        ({"decode_weight": math.inf}, "decode_weight must be a finite number >= 0"),
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"busy_kv_usage": 0.0}, r"busy_kv_usage must be in \(0, 1\]"),
        ({"busy_kv_usage": 1.5}, r"busy_kv_usage must be in \(0, 1\]"),
        ({"busy_prefill_blocks": 0}, "busy_prefill_blocks must be a number > 0"),
        ({"prefill_weight": True}, "prefill_weight must be a finite number"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CostConfig(**kwargs)


def test_no_workers_is_a_caller_bug():
    with pytest.raises(ValueError, match="at least one worker"):
        choose_worker(1, {}, [], CostConfig(), random.Random(0))
