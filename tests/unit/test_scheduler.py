"""Scheduler with the mocker runner: FCFS, chunked prefill, max_num_seqs, preemption by
recompute, abort, unfittable requests. The integrity of scheduler + KV cache is checked after
every step."""

from __future__ import annotations

import pytest

from kvcache.manager import KVCacheManager
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.scheduler import Scheduler, SchedulerOutput
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
)
from workers.mocker.runner import MockerRunner

VOCAB = 500


def req(rid: str, prompt, max_tokens: int = 4, **kw) -> EngineRequest:
    return EngineRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, **kw))


class Harness:
    """schedule -> mocker execute -> update, with an integrity check after every step."""

    def __init__(
        self,
        block_size=4,
        num_blocks=64,
        max_num_seqs=256,
        budget=2048,
        max_model_len=128,
        caching=True,
    ) -> None:
        self.cfg = EngineConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            enable_prefix_caching=caching,
        )
        self.kv = KVCacheManager(num_blocks, self.cfg.hash_config, caching)
        self.sched = Scheduler(self.cfg, self.kv, max_model_len)
        self.runner = MockerRunner(VOCAB, max_model_len)
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, FinishReason] = {}
        self.log: list[SchedulerOutput] = []

    def add(self, *requests: EngineRequest) -> None:
        for r in requests:
            self.sched.add(r, 0.0)
            self.tokens[r.request_id] = []

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.log.append(out)
        if out.batch.seqs:
            for u in self.sched.update(out.batch, self.runner.execute(out.batch), 0.0):
                self.tokens[u.request_id].extend(u.new_token_ids)
                if u.finish_reason is not None:
                    self.finished[u.request_id] = u.finish_reason
        for rid in out.failed:
            self.finished[rid] = FinishReason.ERROR
        self.sched.check_integrity()
        return out

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("requests did not finish")


def shape(out: SchedulerOutput):
    """(id, start_pos, num tokens, sample, is_prefill) per scheduled sequence."""
    return [
        (s.request_id, s.start_pos, len(s.token_ids), s.sample, s.is_prefill)
        for s in out.batch.seqs
    ]


def test_fcfs_and_max_num_seqs():
    h = Harness(max_num_seqs=2)
    h.add(
        req("a", range(1, 6), max_tokens=1),
        req("b", range(10, 15), max_tokens=3),
        req("c", range(20, 25), max_tokens=1),
    )
    assert shape(h.step()) == [("a", 0, 5, True, True), ("b", 0, 5, True, True)]
    assert h.finished == {"a": FinishReason.LENGTH}
    # a finished: c takes its place; the running b goes first
    assert shape(h.step()) == [("b", 5, 1, True, False), ("c", 0, 5, True, True)]
    assert shape(h.step()) == [("b", 6, 1, True, False)]
    assert h.sched.num_running == 0 and h.kv.num_used_blocks == 0
    assert h.finished == {
        "a": FinishReason.LENGTH,
        "c": FinishReason.LENGTH,
        "b": FinishReason.LENGTH,
    }
    assert [len(h.tokens[r]) for r in "abc"] == [1, 3, 1]


def test_strict_fcfs_head_of_line_waits():
    # 4 blocks of 4: a holds 2; b needs 3 (does not fit now); c needs 1 but must wait behind b
    h = Harness(num_blocks=4)
    h.add(
        req("a", range(1, 8), max_tokens=2),
        req("b", range(10, 21), max_tokens=1),
        req("c", [30, 31], max_tokens=1),
    )
    assert shape(h.step()) == [("a", 0, 7, True, True)]
    assert h.sched.waiting_ids() == ["b", "c"]
    assert shape(h.step()) == [("a", 7, 1, True, False)]  # a finishes, frees its blocks
    assert shape(h.step()) == [("b", 0, 11, True, True), ("c", 0, 2, True, True)]


def test_chunked_prefill_exact_chunks():
    h = Harness(budget=8)
    h.add(req("a", range(1, 21), max_tokens=3), req("b", range(30, 35), max_tokens=2))
    assert shape(h.step()) == [("a", 0, 8, False, True)]
    assert shape(h.step()) == [("a", 8, 8, False, True)]
    # a's last chunk (4) leaves 4 of the budget: b gets a chunk of 4 of its 5 tokens
    assert shape(h.step()) == [("a", 16, 4, True, True), ("b", 0, 4, False, True)]
    assert shape(h.step()) == [("a", 20, 1, True, False), ("b", 4, 1, True, True)]
    assert shape(h.step()) == [("a", 21, 1, True, False), ("b", 5, 1, True, False)]
    assert not h.sched.has_unfinished()
    assert h.finished == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    # the chunks carried exactly the prompt tokens, in order
    a_tokens = [
        t for out in h.log for s in out.batch.seqs if s.request_id == "a" for t in s.token_ids
    ]
    assert a_tokens[:20] == list(range(1, 21))


def test_chunking_does_not_change_tokens():
    big, small = Harness(budget=2048), Harness(budget=3)
    for h in (big, small):
        h.add(req("a", range(1, 21), max_tokens=5), req("b", range(40, 47), max_tokens=5))
        h.run()
    assert small.tokens == big.tokens
    assert len(small.log) > len(big.log)


def test_preemption_victim_is_newest_and_tokens_unchanged():
    # 4 blocks of 4: a (6 tokens) and b (8 tokens) fill the cache; in step 2 a fits in its
    # block 1 but b's decode needs a 3rd block: b is the newest running request, so it
    # preempts itself.
    h = Harness(num_blocks=4)
    h.add(req("a", range(1, 7), max_tokens=4), req("b", range(11, 19), max_tokens=4))
    assert shape(h.step()) == [("a", 0, 6, True, True), ("b", 0, 8, True, True)]
    out = h.step()
    assert out.preempted == ("b",)
    assert shape(out) == [("a", 6, 1, True, False)]
    assert h.sched.waiting_ids() == ["b"] and h.sched.get("b").num_computed_tokens == 0
    h.run()
    # b came back as a prefill of prompt + its output so far, minus its first cached block
    resumed = next(s for o in h.log[2:] for s in o.batch.seqs if s.request_id == "b")
    assert (resumed.start_pos, resumed.is_prefill, resumed.sample) == (4, True, True)
    assert resumed.token_ids == tuple(range(15, 19)) + (h.tokens["b"][0],)
    assert h.sched.num_preemptions == 1

    roomy = Harness(num_blocks=64)
    roomy.add(req("a", range(1, 7), max_tokens=4), req("b", range(11, 19), max_tokens=4))
    roomy.run()
    assert h.tokens == roomy.tokens
    assert all(len(t) == 4 for t in h.tokens.values())


def test_preemption_of_another_request_to_free_blocks():
    # a (older) needs a block while b holds the rest: b (newest) is preempted, a continues
    h = Harness(num_blocks=4)
    h.add(req("a", range(1, 9), max_tokens=3), req("b", range(11, 17), max_tokens=3))
    assert shape(h.step()) == [("a", 0, 8, True, True), ("b", 0, 6, True, True)]
    out = h.step()
    assert out.preempted == ("b",)
    assert shape(out) == [("a", 8, 1, True, False)]
    h.run()
    roomy = Harness(num_blocks=64)
    roomy.add(req("a", range(1, 9), max_tokens=3), req("b", range(11, 17), max_tokens=3))
    roomy.run()
    assert h.tokens == roomy.tokens


def test_preemption_picks_newest_and_puts_it_at_the_waiting_front():
    # 4 blocks of 4, one block each; e cannot fit and waits. a's first decode needs a 2nd
    # block: the newest running request (d) is preempted, not b or c.
    h = Harness(num_blocks=4)
    h.add(
        req("a", [1, 2, 3, 4], max_tokens=3),
        req("b", [5, 6, 7], max_tokens=3),
        req("c", [8, 9, 10], max_tokens=3),
        req("d", [11, 12, 13], max_tokens=3),
        req("e", [14], max_tokens=3),
    )
    assert [s[0] for s in shape(h.step())] == ["a", "b", "c", "d"]
    assert h.sched.waiting_ids() == ["e"]
    out = h.step()
    assert out.preempted == ("d",)
    assert shape(out) == [
        ("a", 4, 1, True, False),
        ("b", 3, 1, True, False),
        ("c", 3, 1, True, False),
    ]
    assert h.sched.waiting_ids() == ["d", "e"]
    h.run()
    assert all(len(t) == 3 for t in h.tokens.values())


def test_preemption_repeats_within_a_step_down_to_the_requester_itself():
    # 5 blocks of 2. Step 2 fills the cache; in step 3 a's decode needs a block: c (newest)
    # is preempted; then b's decode needs one and b is now the newest: it preempts itself.
    h = Harness(num_blocks=5, block_size=2, budget=6)
    h.add(
        req("a", [29, 83, 94], max_tokens=3),
        req("b", [10, 69, 28], max_tokens=5),
        req("c", [56], max_tokens=3),
    )
    assert shape(h.step()) == [("a", 0, 3, True, True), ("b", 0, 3, True, True)]
    assert shape(h.step()) == [
        ("a", 3, 1, True, False),
        ("b", 3, 1, True, False),
        ("c", 0, 1, True, True),
    ]
    assert h.kv.num_free_blocks == 0
    out = h.step()
    assert out.preempted == ("c", "b")
    assert shape(out) == [("a", 4, 1, True, False)]
    assert h.finished == {"a": FinishReason.LENGTH}
    assert h.sched.waiting_ids() == ["b", "c"]  # back in arrival order at the front
    # b resumes after its 2 cached full blocks; c recomputes its prompt + first output
    out = h.step()
    assert shape(out) == [("b", 4, 1, True, True), ("c", 0, 2, True, True)]
    assert [s.block_table for s in out.batch.seqs] == [(2, 3, 4), (1,)]
    h.run()
    roomy = Harness(num_blocks=64, block_size=2, budget=6)
    roomy.add(
        req("a", [29, 83, 94], max_tokens=3),
        req("b", [10, 69, 28], max_tokens=5),
        req("c", [56], max_tokens=3),
    )
    roomy.run()
    assert h.tokens == roomy.tokens and h.sched.num_preemptions == 2


def test_abort_frees_everything():
    eng = LLMEngine(MockerRunner(VOCAB, 128), EngineConfig(block_size=4, num_blocks=16))
    eng.add_request(req("a", range(1, 10), max_tokens=50))
    eng.add_request(req("b", range(20, 26), max_tokens=50))
    eng.step()
    eng.check_integrity()
    assert eng.kv.num_used_blocks == 3 + 2
    assert eng.abort("a") is True
    assert eng.kv.num_used_blocks == 2 and eng.scheduler.running_ids() == ["b"]
    assert eng.abort("a") is False and eng.abort("nope") is False
    eng.check_integrity()
    res = eng.step()
    eng.check_integrity()
    by_id = {o.request_id: o for o in res.outputs}
    assert by_id["a"].finished and by_id["a"].finish_reason is FinishReason.ABORT
    assert by_id["a"].new_token_ids == ()
    assert not by_id["b"].finished
    eng.add_request(req("c", range(30, 35)))  # still waiting when aborted
    assert eng.abort("c") and eng.abort("b")
    assert eng.kv.num_used_blocks == 0
    res = eng.step()
    assert sorted((o.request_id, o.finish_reason) for o in res.outputs) == [
        ("b", FinishReason.ABORT),
        ("c", FinishReason.ABORT),
    ]
    assert res.num_scheduled == 0 and not eng.has_unfinished()
    eng.check_integrity()
    assert eng.kv.num_used_blocks == 0 and eng.kv.num_free_blocks == 16


def test_prompt_that_can_never_fit_is_rejected():
    eng = LLMEngine(MockerRunner(VOCAB, 128), EngineConfig(block_size=4, num_blocks=3))
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(req("a", range(1, 14)))
    assert str(e.value) == (
        "the prompt needs 4 KV blocks of 4 tokens but this worker's cache has only 3; "
        "shorten the prompt or start the worker with more KV blocks"
    )
    assert not eng.has_unfinished()


def test_request_growing_past_the_cache_finishes_with_error():
    eng = LLMEngine(MockerRunner(VOCAB, 128), EngineConfig(block_size=4, num_blocks=3))
    [out] = eng.generate([req("a", range(1, 11), max_tokens=10)])
    # prompt 10 + outputs: 12 tokens fit in 3 blocks; the 13th known token needs a 4th
    assert out.finish_reason is FinishReason.ERROR and len(out.token_ids) == 3
    assert out.error == (
        "request 'a' needs 4 KV blocks for 13 tokens (block size 4) but the cache has only 3; "
        "raise num_blocks, or lower max_tokens or max_model_len"
    )
    assert eng.kv.num_used_blocks == 0 and not eng.has_unfinished()
    eng.check_integrity()
    # the engine still serves others afterwards
    [ok] = eng.generate([req("b", range(1, 5), max_tokens=2)])
    assert ok.finish_reason is FinishReason.LENGTH and len(ok.token_ids) == 2


def test_many_requests_tiny_cache_complete_with_same_tokens():
    prompts = {f"r{i}": [(7 * i + j) % 90 + 1 for j in range(3 + (i * 5) % 11)] for i in range(12)}
    tight = Harness(num_blocks=8, budget=6, max_num_seqs=5)
    roomy = Harness(num_blocks=200)
    for h in (tight, roomy):
        h.add(*(req(rid, p, max_tokens=3 + i % 6) for i, (rid, p) in enumerate(prompts.items())))
    victims_per_step = []
    while tight.sched.has_unfinished():
        running_before = tight.sched.running_ids()
        out = tight.step()
        # victims are taken newest first from the end of the running queue
        k = len(out.preempted)
        assert list(out.preempted) == running_before[::-1][:k]
        victims_per_step.append(k)
    roomy.run(max_steps=1000)
    assert tight.tokens == roomy.tokens
    assert tight.sched.num_preemptions > 0 and roomy.sched.num_preemptions == 0
    assert tight.kv.num_used_blocks == 0
