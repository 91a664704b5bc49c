"""router.load: reports, in-flight accounting and the covering rule, exact numbers."""

from __future__ import annotations

import pytest

from router.load import LoadView
from router.types import LoadReport, WorkerLoad


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def view(grace_s: float = 0.0) -> tuple[LoadView, Clock]:
    clock = Clock()
    lv = LoadView(block_size=8, clock=clock, grace_s=grace_s)
    lv.add_worker("a", 100)
    lv.add_worker("b", 200)
    return lv, clock


def numbers(ld: WorkerLoad) -> tuple[int, ...]:
    return (ld.queued_prefill_blocks, ld.decode_blocks, ld.kv_blocks_used, ld.kv_blocks_total,
            ld.waiting, ld.running)


def test_no_report_no_requests():
    lv, _ = view()
    assert [numbers(ld) for ld in lv.loads()] == [(0, 0, 0, 100, 0, 0), (0, 0, 0, 200, 0, 0)]
    assert [ld.worker_id for ld in lv.loads()] == ["a", "b"]


def test_in_flight_lifecycle():
    lv, _ = view()
    lv.on_routed("a", "r1", prefill_blocks=5, decode_blocks=7)
    lv.on_routed("a", "r2", prefill_blocks=2, decode_blocks=3)
    assert numbers(lv.load("a")) == (7, 10, 10, 100, 2, 0)
    assert lv.on_prefill_done("r1") and not lv.on_prefill_done("r1")
    assert numbers(lv.load("a")) == (2, 10, 10, 100, 1, 0)
    assert lv.on_finished("r1") and not lv.on_finished("r1")
    assert numbers(lv.load("a")) == (2, 3, 3, 100, 1, 0)
    assert lv.on_finished("r2")  # finished before its prefill was reported done
    assert numbers(lv.load("a")) == (0, 0, 0, 100, 0, 0)
    assert numbers(lv.load("b")) == (0, 0, 0, 200, 0, 0)


def test_report_plus_uncovered_entries():
    lv, clock = view()
    clock.t = 1.0
    lv.on_routed("a", "r1", 5, 7)
    clock.t = 2.0
    # 17 prompt tokens at block size 8 = 3 blocks; a report stamped by the router at t=2 covers r1
    assert lv.apply_report(LoadReport("a", 50.0, waiting=1, running=2, kv_blocks_used=30,
                                      kv_blocks_total=90, active_prefill_tokens=17,
                                      active_decode_blocks=20))
    assert numbers(lv.load("a")) == (3, 20, 30, 90, 1, 2)
    assert not lv.is_in_flight("r1") and not lv.on_finished("r1")
    clock.t = 3.0
    lv.on_routed("a", "r2", 4, 6)  # after the report: counts on top of it
    assert numbers(lv.load("a")) == (7, 26, 36, 90, 2, 2)


@pytest.mark.parametrize(
    "report_at, covered",
    [(1.0, False), (1.49, False), (1.5, True), (9.0, True)],
)
def test_grace_decides_which_entries_a_report_covers(report_at, covered):
    lv, clock = view(grace_s=0.5)
    clock.t = 1.0
    lv.on_routed("a", "r1", 5, 7)
    clock.t = report_at
    lv.apply_report(LoadReport("a", report_at))
    assert lv.is_in_flight("r1") is not covered
    assert numbers(lv.load("a"))[:2] == ((0, 0) if covered else (5, 7))


def test_report_covers_only_older_entries_in_routing_order():
    lv, clock = view()
    for i, t in enumerate([1.0, 2.0, 3.0]):
        clock.t = t
        lv.on_routed("a", f"r{i}", 1, 10 ** i)
    lv.on_finished("r1")
    clock.t = 2.5
    lv.apply_report(LoadReport("a", 0.0))
    assert [lv.is_in_flight(f"r{i}") for i in range(3)] == [False, False, True]
    assert numbers(lv.load("a"))[:2] == (1, 100)


def test_stale_and_unknown_reports_are_ignored():
    lv, _ = view()
    assert lv.apply_report(LoadReport("a", 5.0, waiting=3))
    assert not lv.apply_report(LoadReport("a", 4.0, waiting=9))
    assert lv.load("a").waiting == 3
    assert lv.apply_report(LoadReport("a", 5.0, waiting=4))  # same time: the newer arrival wins
    assert lv.load("a").waiting == 4
    assert not lv.apply_report(LoadReport("zz", 1.0))


def test_report_without_total_uses_capacity():
    lv, _ = view()
    lv.apply_report(LoadReport("b", 1.0, kv_blocks_used=50))
    assert lv.load("b").kv_blocks_total == 200 and lv.load("b").kv_usage == 0.25


def test_remove_worker_forgets_its_requests():
    lv, _ = view()
    lv.on_routed("a", "r1", 1, 1)
    assert lv.remove_worker("a") and not lv.remove_worker("a")
    assert not lv.is_in_flight("r1") and not lv.on_finished("r1")
    lv.add_worker("a", 10)
    assert numbers(lv.load("a")) == (0, 0, 0, 10, 0, 0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda lv: lv.on_routed("zz", "r", 1, 1), KeyError, "add_worker first"),
        (lambda lv: lv.on_routed("a", "r", -1, 1), ValueError, "prefill_blocks must be"),
        (lambda lv: lv.on_routed("a", "r", 1, 1.5), ValueError, "decode_blocks must be"),
        (lambda lv: (lv.on_routed("a", "r", 1, 1), lv.on_routed("b", "r", 1, 1)), ValueError,
         "already in flight"),
        (lambda lv: lv.add_worker("a", 5), ValueError, "remove it first"),
    ],
)
def test_caller_bugs(call, error, message):
    lv, _ = view()
    with pytest.raises(error, match=message):
        call(lv)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"worker_id": ""}, "worker_id must be a non-empty string"),
        ({"timestamp": float("nan")}, "timestamp must be a finite number"),
        ({"waiting": -1}, "waiting must be an integer >= 0"),
        ({"kv_blocks_used": 1.0}, "kv_blocks_used must be an integer >= 0"),
    ],
)
def test_report_validation(kwargs, message):
    base = {"worker_id": "a", "timestamp": 0.0}
    with pytest.raises(ValueError, match=message):
        LoadReport(**(base | kwargs))
