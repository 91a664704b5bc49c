"""LLMEngine over the mocker runner: prefix-cache hits and KV events, stop conditions, stop
strings, request validation, stats."""

from __future__ import annotations

import pytest

from kvcache.events import BlockStored
from kvcache.hashing import BlockHashConfig, hash_blocks
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.types import (
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
)
from workers.mocker.runner import MockerRunner
from workers.mocker.timing import TimingModel

VOCAB = 300
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class LetterTokenizer:
    """Token i decodes to one letter (i % 26); token 299 is a special EOS token."""

    eos_token_ids = (299,)
    vocab_size = VOCAB

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (i == 299 and skip_special_tokens) else LETTERS[i % 26] for i in ids)


def engine(tokenizer=None, **cfg) -> LLMEngine:
    cfg.setdefault("block_size", 4)
    cfg.setdefault("num_blocks", 32)
    return LLMEngine(MockerRunner(VOCAB, 64), EngineConfig(**cfg), tokenizer)


def req(rid, prompt, max_tokens=8, **kw) -> EngineRequest:
    return EngineRequest(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, **kw))


def run(eng: LLMEngine) -> list:
    results = []
    while eng.has_unfinished():
        results.append(eng.step())
        eng.check_integrity()
    return results


def test_shared_prefix_hits_cache_and_events_are_exact():
    cfg = BlockHashConfig(block_size=4, seed=0)
    eng = engine()
    a = list(range(1, 11))
    eng.add_request(req("a", a, max_tokens=3))
    steps = run(eng)
    out_a = [t for s in steps for o in s.outputs for t in o.new_token_ids]
    assert len(out_a) == 3
    ha = hash_blocks(a + out_a[:2], cfg)  # block 2 fills at a's 2nd decode
    # prefill stores blocks 0-1; the 1st decode fills nothing (no batch, no number used);
    # the 2nd decode fills block 2 (prompt tokens 8-9 + the first two outputs)
    assert [s.kv_events and s.kv_events.seq for s in steps] == [0, None, 1]
    assert steps[0].kv_events.events == (BlockStored((ha[0], ha[1]), None),)
    assert steps[2].kv_events.events == (BlockStored((ha[2],), ha[1]),)
    assert steps[2].kv_events.timestamp == eng.runner.now()

    b = a[:8] + [200, 201, 202]
    eng.add_request(req("b", b, max_tokens=2))
    steps_b = run(eng)
    first = steps_b[0].outputs[0]
    assert first.num_cached_tokens == 8 and first.num_prompt_tokens == 11
    out_b = [t for s in steps_b for o in s.outputs for t in o.new_token_ids]
    hb = hash_blocks(b + out_b[:1], cfg)
    assert hb[:2] == ha[:2]
    # b's prefill hits blocks 0-1 and stores nothing; its decode fills its own block 2
    assert [s.kv_events and s.kv_events.seq for s in steps_b] == [None, 2]
    assert steps_b[1].kv_events.events == (BlockStored((hb[2],), hb[1]),)
    assert eng.stats().prefix_hit_rate == 8 / 21


def test_event_seqs_consecutive_across_many_steps():
    eng = engine(num_blocks=6)
    for i in range(6):
        eng.add_request(req(f"r{i}", [i + 1] * 7 + [i + 2], max_tokens=6))
    seqs = [s.kv_events.seq for s in run(eng) if s.kv_events is not None]
    assert seqs == list(range(len(seqs))) and len(seqs) > 3


def test_prefix_hit_gives_same_tokens_as_no_caching():
    prompts = [list(range(1, 13)), list(range(1, 9)) + [50, 51, 52]]
    results = []
    for caching in (True, False):
        eng = engine(enable_prefix_caching=caching)
        outs = eng.generate([req("a", prompts[0])])
        outs += eng.generate([req("b", prompts[1])])
        results.append([(o.token_ids, o.num_cached_tokens) for o in outs])
    assert [r[0] for r in results[0]] == [r[0] for r in results[1]]
    assert [r[1] for r in results[0]] == [0, 8] and [r[1] for r in results[1]] == [0, 0]


def test_stop_token_ids_eos_and_lengths():
    eng = engine()
    [free] = eng.generate([req("x", [5, 6, 7], max_tokens=6)])
    toks = free.token_ids
    assert free.finish_reason is FinishReason.LENGTH and len(toks) == 6

    [o] = engine().generate([req("x", [5, 6, 7], max_tokens=6, stop_token_ids=(toks[2],))])
    assert o.token_ids == toks[:3] and o.finish_reason is FinishReason.STOP

    # max_model_len 5: prompt 3 + 2 outputs
    [o] = engine(max_model_len=5).generate([req("x", [5, 6, 7], max_tokens=6)])
    assert o.token_ids == toks[:2] and o.finish_reason is FinishReason.LENGTH

    class Eos(LetterTokenizer):
        eos_token_ids = (toks[1],)

    [o] = engine(Eos()).generate([req("x", [5, 6, 7], max_tokens=6)])
    assert o.token_ids == toks[:2] and o.finish_reason is FinishReason.STOP
    [o] = engine(Eos()).generate([req("x", [5, 6, 7], max_tokens=6, ignore_eos=True)])
    assert o.token_ids == toks and o.finish_reason is FinishReason.LENGTH


def test_stop_string_through_engine():
    tok = LetterTokenizer()
    [free] = engine(tok).generate([req("x", [1, 2, 3], max_tokens=10)])
    text = "".join(LETTERS[t % 26] for t in free.token_ids)
    assert free.text == text
    stop = text[4:6]  # spans two tokens
    cut = text.find(stop)
    eng = engine(tok)
    eng.add_request(req("x", [1, 2, 3], max_tokens=10, stop=(stop,)))
    streamed, outs = [], []
    for s in run(eng):
        outs.extend(s.outputs)
        streamed.extend(o.new_text for o in s.outputs)
    final = outs[-1]
    assert final.finished and final.finish_reason is FinishReason.STOP
    assert "".join(streamed) == text[:cut]
    assert [t for o in outs for t in o.new_token_ids] == list(free.token_ids[: cut + len(stop)])
    assert eng.kv.num_used_blocks == 0
    for piece in streamed:  # no piece of the stop string was ever shown
        assert stop not in piece


def test_timestamps_on_virtual_clock():
    timing = TimingModel()
    eng = LLMEngine(MockerRunner(VOCAB, 64, timing), EngineConfig(block_size=4, num_blocks=8))
    [o] = eng.generate([req("x", range(1, 11), max_tokens=2)])
    t_prefill = timing.prefill_ms(10) / 1000
    t_decode = timing.decode_ms(3 / 8) / 1000  # 11 tokens held: 3 of 8 blocks
    assert o.arrival_time == 0.0
    assert o.first_token_time == pytest.approx(t_prefill, abs=1e-15)
    assert o.finish_time == pytest.approx(t_prefill + t_decode, abs=1e-15)


def test_stats_during_a_run():
    eng = engine(max_num_batched_tokens=6, max_num_seqs=1)
    eng.add_request(req("a", range(1, 11), max_tokens=2))
    eng.add_request(req("b", range(20, 25), max_tokens=2))
    s0 = eng.stats()
    assert (s0.num_waiting, s0.num_running, s0.num_active_prefill_tokens) == (2, 0, 15)
    res = eng.step()
    assert res.num_scheduled == 1 and res.num_scheduled_tokens == 6 and res.outputs == []
    st = res.stats
    assert (st.num_waiting, st.num_running, st.kv_blocks_used, st.kv_blocks_total) == (1, 1, 2, 32)
    assert st.kv_usage == 2 / 32 and st.num_active_prefill_tokens == 4 + 5
    assert st.num_preemptions == 0 and st.prefix_hit_rate == 0.0


def test_waiting_requests_count_only_their_uncached_prompt_tokens():
    eng = engine()  # block size 4
    run_once = eng.generate([req("first", range(1, 11), max_tokens=1)])
    assert run_once[0].finish_reason is not None  # blocks [1..4], [5..8] now cached
    eng.add_request(req("same-prefix", list(range(1, 9)) + [50, 51, 52], max_tokens=1))
    eng.add_request(req("new", range(60, 65), max_tokens=1))
    # 11 - 8 cached + 5 uncached; a whole-prompt count would say 16
    assert eng.stats().num_active_prefill_tokens == 3 + 5


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "request_, message",
    [
        (req("e", []), "the prompt is empty; send at least one prompt token"),
        (
            req("l", range(64)),
            (
                "the prompt has 64 tokens but max_model_len is 64; shorten the "
                "prompt to at most 63 tokens to leave room for the output"
            ),
        ),
        (
            req("v", [1, 300, 2]),
            (
                "prompt token id 300 at position 1 is outside the vocabulary "
                "[0, 300); tokenize the prompt with this model's tokenizer"
            ),
        ),
        (
            req("n", [1, -1]),
            (
                "prompt token id -1 at position 1 is outside the vocabulary "
                "[0, 300); tokenize the prompt with this model's tokenizer"
            ),
        ),
        (req("t", [1, "2"]), "prompt token ids must be integers; position 1 holds '2'"),
        (
            req("s", [1, 2], stop=("END",)),
            (
                "stop strings need a tokenizer but this engine has none; "
                "use stop_token_ids instead, or start the engine with a "
                "tokenizer"
            ),
        ),
        (req("", [1]), "request_id must be a non-empty string, got ''"),
    ],
)
def test_invalid_requests(request_, message):
    eng = engine()
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(request_)
    assert str(e.value) == message
    assert not eng.has_unfinished()


def test_numpy_token_ids_are_accepted():
    np = pytest.importorskip("numpy")
    eng = engine()
    [o] = eng.generate([EngineRequest("a", np.arange(1, 6), SamplingParams(max_tokens=2))])
    [o2] = engine().generate([req("a", range(1, 6), max_tokens=2)])
    assert o.token_ids == o2.token_ids and o.num_prompt_tokens == 5


def test_duplicate_id_and_reuse_after_finish():
    eng = engine()
    eng.add_request(req("a", [1, 2], max_tokens=1))
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(req("a", [3, 4]))
    assert (
        str(e.value) == "request id 'a' is already in use; give every request a unique request_id"
    )
    run(eng)
    eng.add_request(req("a", [3, 4], max_tokens=1))  # free again once reported finished
    assert eng.has_unfinished()


def test_generate_rolls_back_when_a_request_is_invalid():
    eng = engine()
    with pytest.raises(InvalidRequestError):
        eng.generate([req("ok", [1, 2]), req("bad", [])])
    run(eng)  # "ok" was aborted: reported once, nothing left
    assert not eng.has_unfinished() and eng.kv.num_used_blocks == 0


def test_config_validation_and_model_limit():
    with pytest.raises(ValueError) as e:
        EngineConfig(max_num_batched_tokens=0)
    assert str(e.value) == (
        "max_num_batched_tokens must be a positive integer, got 0; "
        "set the per-step token budget, e.g. 2048"
    )
    with pytest.raises(ValueError) as e:
        EngineConfig(hash_seed=-1)
    assert "hash_seed must be an integer in [0, 2**64), got -1" in str(e.value)
    assert EngineConfig(block_size=8, hash_seed=3).hash_config == BlockHashConfig(8, 3)
    with pytest.raises(ValueError) as e:
        LLMEngine(MockerRunner(VOCAB, 64), EngineConfig(max_model_len=65))
    assert str(e.value) == (
        "max_model_len=65 exceeds the model's context of 64 tokens; "
        "set max_model_len <= 64 or leave it unset"
    )
    assert LLMEngine(MockerRunner(VOCAB, 64), EngineConfig()).max_model_len == 64
