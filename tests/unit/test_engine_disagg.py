"""Disaggregation at engine level: a prefill engine pins its prompt blocks, a decode engine
imports them (workers.engine.kv_import) and decodes; greedy tokens equal one aggregated run.
The KV is copied here by plain tensor indexing (the transports have their own tests)."""

from __future__ import annotations

import pytest

from kvcache.events import BlockStored
from kvcache.hashing import hash_blocks
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.factory import build_torch_engine
from workers.engine.kv_import import (
    ImportRefused,
    abandon_import,
    check_handle,
    commit_import,
    plan_import,
)
from workers.engine.types import EngineRequest, FinishReason, SamplingParams
from workers.mocker.runner import MockerRunner

BS = 4


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny"))


def torch_engine(folder, **kw) -> LLMEngine:
    kw.setdefault("num_blocks", 64)
    return build_torch_engine(str(folder), EngineConfig(block_size=BS, **kw)).engine


def mocker_engine(**kw) -> LLMEngine:
    kw.setdefault("num_blocks", 32)
    return LLMEngine(MockerRunner(384, 256), EngineConfig(block_size=BS, **kw))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def prefill(engine: LLMEngine, rid: str, prompt: tuple[int, ...]):
    out = engine.generate([EngineRequest(rid, prompt, greedy(1), pin_prompt=True)])[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 1
    engine.check_integrity()
    return out


def copy_blocks(src: LLMEngine, src_ids, dst: LLMEngine, dst_ids) -> None:
    for a, b in zip(src.runner.kv_caches, dst.runner.kv_caches, strict=True):
        for s, d in zip(src_ids, dst_ids, strict=True):
            b[:, d * BS:(d + 1) * BS] = a[:, s * BS:(s + 1) * BS]


def test_pinned_blocks_are_reported_and_stay_in_use_until_released():
    eng = mocker_engine()
    prompt = tuple(range(10, 21))  # 11 tokens: 2 full blocks
    eng.add_request(EngineRequest("p", prompt, greedy(1), pin_prompt=True))
    outs = [o for _ in range(3) for o in eng.step().outputs]
    last = outs[-1]
    assert last.finished and last.pinned is not None
    assert last.pinned.block_ids == (0, 1) and last.pinned.num_tokens == 8
    assert last.pinned.block_hashes == tuple(hash_blocks(list(prompt), eng.config.hash_config))
    assert eng.kv.num_used_blocks == 2
    eng.check_integrity()
    assert eng.kv.holds.release(last.pinned.hold_id)
    assert eng.kv.num_used_blocks == 0
    eng.check_integrity()


def test_an_aborted_pin_request_pins_nothing():
    eng = mocker_engine()
    eng.add_request(EngineRequest("p", tuple(range(10, 30)), greedy(1), pin_prompt=True))
    eng.abort("p")
    out = eng.step().outputs[0]
    assert out.finish_reason is FinishReason.ABORT and out.pinned is None
    assert eng.kv.num_used_blocks == 0 and len(eng.kv.holds) == 0


@pytest.mark.parametrize("prompt_len", [9, 12, 23])
def test_decode_after_import_equals_aggregated_and_computes_only_the_rest(tiny_folder,
                                                                           prompt_len):
    prompt = tuple(20 + (i * 37) % 300 for i in range(prompt_len))
    whole = torch_engine(tiny_folder).generate([EngineRequest("a", prompt, greedy(8))])[0]

    p_eng, d_eng = torch_engine(tiny_folder), torch_engine(tiny_folder)
    first = prefill(p_eng, "r", prompt)
    pin = first.pinned
    assert pin.num_tokens == (prompt_len // BS) * BS
    check_handle(d_eng, prompt + first.token_ids, pin.block_hashes, pin.num_tokens, BS)
    plan = plan_import(d_eng, pin.block_hashes, "r")
    assert plan.skip_blocks == 0 and plan.pull_blocks == len(pin.block_ids)
    copy_blocks(p_eng, pin.block_ids, d_eng, plan.dest_block_ids)
    assert commit_import(d_eng, plan) == len(pin.block_ids)
    assert d_eng.kv.drain_events(0.0).events == (BlockStored(pin.block_hashes, None),)
    assert p_eng.kv.holds.release(pin.hold_id)
    p_eng.check_integrity()
    d_eng.check_integrity()

    rest = d_eng.generate([EngineRequest("r", prompt + first.token_ids, greedy(7))])[0]
    assert first.token_ids + rest.token_ids == whole.token_ids
    assert rest.num_cached_tokens == pin.num_tokens
    assert p_eng.kv.num_used_blocks == 0 and d_eng.kv.num_used_blocks == 0


def test_a_second_import_pulls_only_blocks_not_cached_yet(tiny_folder):
    d_eng = mocker_engine()
    turn1 = tuple(range(30, 42))  # 3 blocks
    turn2 = turn1 + (7, 8, 9, 10, 11)  # 4 full blocks
    h1 = hash_blocks(list(turn1), d_eng.config.hash_config)
    plan = plan_import(d_eng, h1, "t1")
    commit_import(d_eng, plan, turn1)
    h2 = hash_blocks(list(turn2), d_eng.config.hash_config)
    plan2 = plan_import(d_eng, h2, "t2")
    assert (plan2.skip_blocks, plan2.pull_blocks) == (3, 1)
    assert commit_import(d_eng, plan2, turn2) == 1
    assert d_eng.kv.cached_prefix_blocks(h2) == 4
    d_eng.check_integrity()


def test_no_room_plans_a_local_prefill_and_abandon_frees_the_reservation():
    d_eng = mocker_engine(num_blocks=4)
    hashes = hash_blocks(list(range(24)), d_eng.config.hash_config)  # 6 blocks > 4
    plan = plan_import(d_eng, hashes, "big")
    assert plan.no_room and plan.dest_block_ids == ()
    small = plan_import(d_eng, hashes[:2], "small")
    assert small.dest_block_ids == (0, 1)
    abandon_import(d_eng, small)
    assert d_eng.kv.num_used_blocks == 0 and d_eng.kv.cached_prefix_blocks(hashes) == 0
    d_eng.check_integrity()


def test_a_handle_for_other_tokens_or_block_size_is_refused():
    d_eng = mocker_engine()
    prompt = tuple(range(40, 52))
    h = hash_blocks(list(prompt), d_eng.config.hash_config)
    check_handle(d_eng, prompt, h, 12, BS)
    with pytest.raises(ImportRefused, match="same --block-size"):
        check_handle(d_eng, prompt, h, 12, 8)
    with pytest.raises(ImportRefused, match="not those of this prompt"):
        check_handle(d_eng, (1,) + prompt[1:], h, 12, BS)
    with pytest.raises(ImportRefused, match="whole blocks of the prompt"):
        check_handle(d_eng, prompt, h, 11, BS)
