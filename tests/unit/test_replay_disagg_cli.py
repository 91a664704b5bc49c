"""``ferry replay [--offline] --prefill-workers P --decode-workers D``: the flags reach the
config, bad combinations exit 2 with a message naming the fix, and the report shows the
decisions."""

from __future__ import annotations

import argparse
import json

import pytest

from orchestrator.commands import replay as replay_cmd
from orchestrator.replay.config import TRANSFER_MODEL_OFFLINE_ONLY
from orchestrator.replay.transfer import KvTransferModel
from router.disagg import DisaggConfig

LINE = '{"timestamp": 0, "input_length": 100, "output_length": 3, "hash_ids": [7]}\n'


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    replay_cmd.add_parser(parser.add_subparsers(dest="command"), "replay")
    return parser.parse_args(["replay", *argv])


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(LINE + LINE.replace('"timestamp": 0', '"timestamp": 5000'))
    return path


def test_disagg_flags_reach_the_config():
    c = replay_cmd.build_config(parse(
        "x.jsonl", "--offline", "--prefill-workers", "2", "--decode-workers", "3",
        "--max-local-prefill-tokens", "64", "--max-prefill-queue-tokens", "none",
        "--kv-bytes-per-token", "1000", "--kv-transfer-gbps", "12.5",
        "--kv-transfer-latency-ms", "0.5"))
    assert (c.prefill_workers, c.decode_workers, c.num_workers, c.disaggregated) == (2, 3, 5,
                                                                                    True)
    assert c.disagg == DisaggConfig(max_local_prefill_tokens=64, max_prefill_queue_tokens=None)
    assert c.transfer == KvTransferModel(bytes_per_token=1000, bandwidth_gb_s=12.5,
                                         latency_ms=0.5)
    plain = replay_cmd.build_config(parse("x.jsonl", "--prefill-workers", "1",
                                          "--decode-workers", "1"))
    assert plain.disagg == DisaggConfig() and plain.transfer == KvTransferModel()
    assert replay_cmd.build_config(parse("x.jsonl")).disagg is None


@pytest.mark.parametrize("argv, message", [
    (["--offline", "--prefill-workers", "2"],
     "give both --prefill-workers and --decode-workers for a disaggregated replay, or neither"),
    (["--offline", "--decode-workers", "2"], "give both --prefill-workers and --decode-workers"),
    (["--offline", "--prefill-workers", "0", "--decode-workers", "2"],
     "prefill_workers must be an integer >= 1"),
    (["--offline", "--workers", "4", "--prefill-workers", "1", "--decode-workers", "1"],
     "give either --workers N (aggregated workers) or --prefill-workers P --decode-workers D"),
    (["--offline", "--kv-transfer-gbps", "10"],
     "--kv-transfer-gbps only apply to a disaggregated replay: add --prefill-workers P"),
    (["--offline", "--workers", "2", "--max-local-prefill-tokens", "0",
      "--max-prefill-queue-tokens", "none"],
     "--max-local-prefill-tokens, --max-prefill-queue-tokens only apply to a disaggregated"),
    (["--prefill-workers", "1", "--decode-workers", "1", "--kv-bytes-per-token", "1000"],
     TRANSFER_MODEL_OFFLINE_ONLY),
    (["--offline", "--prefill-workers", "1", "--decode-workers", "1", "--kv-transfer-gbps",
      "0"], "kv transfer bandwidth must be a number of GB/s > 0"),
    (["--offline", "--prefill-workers", "1", "--decode-workers", "1",
      "--max-local-prefill-tokens", "-1"], "max_local_prefill_tokens must be an integer >= 0"),
])
def test_bad_combinations_exit_2_with_the_fix(trace, capsys, argv, message):
    assert replay_cmd.run(parse(str(trace), *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferry replay: ") and message in err, err


def test_offline_disagg_prints_the_decisions_and_writes_json(trace, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert replay_cmd.run(parse(
        str(trace), "--offline", "--prefill-workers", "1", "--decode-workers", "2",
        "--block-size", "16", "--num-blocks", "64", "--max-local-prefill-tokens", "32",
        "--json", str(out))) == 0
    table = capsys.readouterr().out
    assert "offline, router kv, 1 prefill + 2 decode workers, speedup 1" in table
    assert "2 completed of 2" in table
    # turn 1: 100 uncached tokens, remote; turn 2 (the same prompt) on the decode worker that
    # pulled its 6 blocks: 4 tokens uncached there, local
    assert "remote prefill               1 (long_prefill 1)" in table
    assert "local prefill                1 (short_prefill 1)" in table
    obj = json.loads(out.read_text())
    assert (obj["completed"], obj["workers"], obj["cached_tokens"]) == (2, 3, 96)
    dis = obj["disagg"]
    assert (dis["remote"], dis["local"], dis["pulls"], dis["pulled_blocks"]) == (1, 1, 1, 6)
    assert dis["decisions"]["short_prefill"] == 1
    assert obj["config"]["disagg"] == {"max_local_prefill_tokens": 32,
                                       "max_prefill_queue_tokens": 16384}
    assert obj["config"]["transfer"] == {"bytes_per_token": 131072, "bandwidth_gb_s": 64.0,
                                         "latency_ms": 0.0}
