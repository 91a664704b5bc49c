"""The torch engine end to end on a tiny random Llama: prefix reuse, continuous batching,
preemption, and the CLI's bad-input errors."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main as ferry
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder
from workers.engine.config import EngineConfig
from workers.engine.factory import build_torch_engine
from workers.engine.types import EngineRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny"))


def engine_for(folder, **kw):
    return build_torch_engine(str(folder), EngineConfig(**kw)).engine


def prompts(n: int) -> list[tuple[int, ...]]:
    # different lengths, sharing a 16-token head for some
    head = tuple(range(10, 26))
    return [head[: (i % 3) * 8] + tuple(30 + (7 * i + j) % 200 for j in range(5 + 3 * i))
            for i in range(n)]


def test_prefix_reuse_computes_only_new_tokens(tiny_folder):
    engine = engine_for(tiny_folder, block_size=4, num_blocks=64)
    shared = tuple(range(20, 40))  # 20 tokens = 5 full blocks
    first = engine.generate([EngineRequest("a", shared + (50, 51), GREEDY)])[0]
    second = engine.generate([EngineRequest("b", shared + (60, 61, 62), GREEDY)])[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 20
    alone = engine_for(tiny_folder, block_size=4, num_blocks=64, enable_prefix_caching=False)
    ref = alone.generate([EngineRequest("b", shared + (60, 61, 62), GREEDY)])[0]
    assert second.token_ids == ref.token_ids
    engine.check_integrity()


def test_same_prompt_again_recomputes_only_the_last_block(tiny_folder):
    engine = engine_for(tiny_folder, block_size=4, num_blocks=64)
    prompt = tuple(range(20, 36))  # exactly 4 full blocks
    a = engine.generate([EngineRequest("a", prompt, GREEDY)])[0]
    b = engine.generate([EngineRequest("b", prompt, GREEDY)])[0]
    assert b.num_cached_tokens == 12  # never the whole prompt: the last block is recomputed
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("num_blocks", [512, 24])
def test_sixteen_concurrent_equal_one_at_a_time(tiny_folder, num_blocks):
    reqs = [EngineRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts(16))]
    solo = engine_for(tiny_folder, block_size=4, num_blocks=512)
    expected = {r.request_id: solo.generate([r])[0].token_ids for r in reqs}
    engine = engine_for(tiny_folder, block_size=4, num_blocks=num_blocks,
                        max_num_batched_tokens=32)
    got = {o.request_id: o.token_ids for o in engine.generate(reqs)}
    assert got == expected
    stats = engine.stats()
    if num_blocks == 24:  # 16 requests of up to 62 tokens cannot all fit in 96 slots
        assert stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0
    engine.check_integrity()


def run_cli(capsys, *args):
    code = ferry(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_json(tiny_folder, capsys):
    code, out, _ = run_cli(capsys, "--model", str(tiny_folder), "--prompt", "hello world",
                           "--max-tokens", "5", "--ignore-eos", "--json")
    assert code == 0
    obj = json.loads(out)
    assert len(obj["token_ids"]) == 5 and obj["prompt_token_ids"] and obj["cached_tokens"] == 0
    assert obj["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "hi", "--max-tokens", "0"], "max_tokens must be at least 1"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "hello " * 300], "256"),
    ],
)
def test_cli_bad_input_says_what_to_change(tiny_folder, capsys, args, message):
    code, _, err = run_cli(capsys, "--model", str(tiny_folder), *args)
    assert code == 2
    assert message in err


def test_cli_unknown_model_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert code == 2
    assert "pass a Hugging Face model folder" in err
