"""ReplayConfig and the ``ferry replay`` command line: every bad value is refused with a
message naming the fix; good values reach the config unchanged."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from orchestrator.commands import replay as replay_cmd
from orchestrator.replay.config import ReplayConfig
from router.cost import CostConfig
from router.types import RouterMode
from workers.mocker.timing import TimingModel

LINE = '{"timestamp": 0, "input_length": 100, "output_length": 3, "hash_ids": [7]}\n'


def cfg(**kwargs) -> ReplayConfig:
    return ReplayConfig(trace=Path("t.jsonl"), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": 0}, r"workers must be an integer >= 1, got 0; give the number of workers"),
    ({"workers": 2.5}, r"workers must be an integer >= 1, got 2.5"),
    ({"workers": True}, r"workers must be an integer >= 1, got True"),
    ({"prefill_workers": 2}, "give both --prefill-workers and --decode-workers"),
    ({"decode_workers": 2}, "give both --prefill-workers and --decode-workers"),
    ({"prefill_workers": 0, "decode_workers": 2}, r"prefill_workers must be an integer >= 1"),
    ({"router": "fastest"},
     "unknown router 'fastest'; choose one of kv, approx, round_robin, random"),
    ({"speedup": 0}, r"speedup must be a number > 0 \(arrival times are divided by it"),
    ({"speedup": -2.0}, "speedup must be a number > 0"),
    ({"speedup": math.inf}, "speedup must be a number > 0"),
    ({"speedup": math.nan}, "speedup must be a number > 0"),
    ({"speedup": "4"}, "speedup must be a number > 0"),
    ({"block_size": 0}, "block_size must be an integer >= 1, got 0; e.g. 64"),
    ({"num_blocks": -1}, "num_blocks must be an integer >= 1, got -1; KV blocks per worker"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an integer >= 1"),
    ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
    ({"limit": 0}, "limit must be an integer >= 1, got 0; or leave it unset"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64\)"),
    ({"hash_seed": 2**64}, r"hash_seed must be an integer in \[0, 2\*\*64\)"),
    ({"vocab_size": 1}, "vocab_size must be an integer >= 2"),
])
def test_bad_values_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cfg(**kwargs)


def test_wrong_types_for_timing_and_cost():
    with pytest.raises(TypeError, match="timing must be a TimingModel, got dict"):
        cfg(timing={"a": 1.0})
    with pytest.raises(TypeError, match="cost must be a CostConfig or None, got dict"):
        cfg(cost={"prefill_weight": 1.0})


def test_defaults_and_normalisation():
    c = cfg(router="round_robin", speedup=4)
    assert c.trace == Path("t.jsonl") and c.router is RouterMode.ROUND_ROBIN
    assert (c.workers, c.block_size, c.num_blocks, c.max_num_batched_tokens, c.max_num_seqs,
            c.limit, c.disaggregated) == (8, 64, 16384, 8192, 256, None, False)
    assert c.cost_config == CostConfig() and c.timing == TimingModel()
    assert cfg(prefill_workers=2, decode_workers=6).disaggregated


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    replay_cmd.add_parser(parser.add_subparsers(dest="command"), "replay")
    return parser.parse_args(["replay", *argv])


def test_cli_flags_reach_the_config():
    args = parse("x.jsonl", "--offline", "--workers", "3", "--router", "approx", "--speedup",
                 "2.5", "--block-size", "16", "--num-blocks", "100", "--max-batched-tokens",
                 "512", "--max-num-seqs", "7", "--prefill-a", "0", "--decode-r", "2",
                 "--limit", "9", "--seed", "4", "--decode-weight", "0.5", "--busy-kv-usage",
                 "none", "--busy-prefill-blocks", "300", "--temperature", "0.2")
    c = replay_cmd.build_config(args)
    assert (c.trace, c.workers, c.router, c.speedup, c.block_size, c.num_blocks,
            c.max_num_batched_tokens, c.max_num_seqs, c.limit, c.seed) == (
        Path("x.jsonl"), 3, RouterMode.APPROX, 2.5, 16, 100, 512, 7, 9, 4)
    assert c.timing == TimingModel(a=0.0, r=2.0)
    assert c.cost == CostConfig(decode_weight=0.5, busy_kv_usage=None, busy_prefill_blocks=300,
                                temperature=0.2)
    assert replay_cmd.build_config(parse("x.jsonl")).cost == CostConfig()


@pytest.mark.parametrize("argv, message", [
    (["--speedup", "0"], "ferry replay: speedup must be a number > 0"),
    (["--workers", "0"], "ferry replay: workers must be an integer >= 1"),
    (["--prefill-workers", "1"], "ferry replay: give both --prefill-workers"),
    (["--limit", "-3"], "ferry replay: limit must be an integer >= 1"),
    (["--decode-weight", "-1"], ("ferry replay: CostConfig.decode_weight must be a finite "
                                 "number >= 0")),
    (["--busy-kv-usage", "1.5"], "ferry replay: CostConfig.busy_kv_usage must be in (0, 1]"),
])
def test_cli_bad_values_exit_2_with_the_message(tmp_path, capsys, argv, message):
    trace = tmp_path / "t.jsonl"
    trace.write_text(LINE)
    assert replay_cmd.run(parse(str(trace), "--offline", *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err


def test_cli_missing_trace_exits_2(tmp_path, capsys):
    assert replay_cmd.run(parse(str(tmp_path / "none.jsonl"), "--offline")) == 2
    assert "trace file" in capsys.readouterr().err


def test_cli_offline_prints_the_table_and_writes_json(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text(LINE + LINE.replace('"timestamp": 0', '"timestamp": 5000'))
    out = tmp_path / "r.json"
    assert replay_cmd.run(parse(str(trace), "--offline", "--workers", "2", "--block-size",
                                "16", "--num-blocks", "64", "--json", str(out))) == 0
    table = capsys.readouterr().out
    assert "offline, router kv, 2 workers, speedup 1" in table
    assert "2 completed of 2" in table
    obj = json.loads(out.read_text())
    assert (obj["completed"], obj["failed"], obj["output_tokens"]) == (2, 0, 6)
    # the second request repeats the first: 6 of its 7 blocks are cached (the last is computed)
    assert obj["cached_tokens"] == 96 and obj["oracle_hit_tokens"] == 96
    assert obj["config"]["router"] == "kv" and obj["config"]["block_size"] == 16
    assert obj["config"]["cost"] == json.loads(json.dumps(CostConfig().__dict__))
