"""ferry serve's worker roles: ServeConfig's validation of --workers / --prefill-workers /
--decode-workers, the workers a deployment starts (ids and roles), the CLI's errors, and the
routing config carrying the disaggregation thresholds."""

from __future__ import annotations

import argparse

import pytest

from orchestrator.commands import serve as serve_command
from orchestrator.serve import Endpoints, ServeConfig, routing_config, worker_roles, worker_specs
from orchestrator.worker_actor import WorkerEndpoint, WorkerSpec
from router.disagg import DisaggConfig


def test_aggregated_by_default_and_disaggregated_on_request():
    assert worker_roles(ServeConfig()) == [("w0", "aggregated")]
    assert worker_roles(ServeConfig(workers=3)) == [("w0", "aggregated"), ("w1", "aggregated"),
                                                    ("w2", "aggregated")]
    cfg = ServeConfig(prefill_workers=2, decode_workers=1)
    assert worker_roles(cfg) == [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")]
    specs = worker_specs(cfg, "nats://127.0.0.1:4222", vocab=100, max_len=64)
    assert [(s.worker_id, s.role) for s in specs] == worker_roles(cfg)
    assert all(s.nats_url == "nats://127.0.0.1:4222" for s in specs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prefill_workers": 1}, (r"give both --prefill-workers and --decode-workers \(at least 1 "
                             r"each; got 1 and 0\), or --workers N alone")),
    ({"decode_workers": 2}, r"got 0 and 2\)"),
    ({"prefill_workers": -1, "decode_workers": 1}, ("--prefill-workers must be an integer >= 1, "
                                                   "got -1")),
    ({"prefill_workers": 1, "decode_workers": True}, "--decode-workers must be an integer"),
    ({"workers": 2, "prefill_workers": 1, "decode_workers": 1},
     r"give either --workers N \(aggregated workers\) or --prefill-workers P --decode-workers D"),
])
def test_bad_role_counts_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**kwargs)


def test_a_worker_spec_takes_only_known_roles():
    assert WorkerSpec("p0", "m", "m", role="prefill").role == "prefill"
    with pytest.raises(ValueError, match=r"role must be one of \['aggregated', 'prefill', "
                                         r"'decode'\], got 'both'"):
        WorkerSpec("x", "m", "m", role="both")


def test_the_routing_config_carries_the_thresholds():
    disagg = DisaggConfig(max_local_prefill_tokens=0, max_prefill_queue_tokens=None)
    cfg = ServeConfig(prefill_workers=1, decode_workers=1, disagg=disagg)
    assert routing_config(cfg).disagg == disagg
    assert routing_config(ServeConfig()).disagg == DisaggConfig()
    with pytest.raises(TypeError, match="disagg must be a DisaggConfig"):
        ServeConfig(disagg={"max_local_prefill_tokens": 0})


def test_endpoints_name_the_roles():
    def ep(wid, role):
        return WorkerEndpoint(wid, f"127.0.0.1:{len(wid)}", 7, 16, 0, 64, 2048, role)

    lines = Endpoints("http://h", "g", "k", "nats://n", "r", "m",
                      (ep("p0", "prefill"), ep("d0", "decode"), ep("d1", "decode"))).lines()
    assert lines[0] == "ferry: serving model 'm' on 1 prefill + 2 decode workers"
    assert lines[-3].endswith("(prefill)") and lines[-1].endswith("(decode)")
    lines = Endpoints("http://h", "g", "k", "nats://n", "r", "m", (ep("w0", "aggregated"),)
                      ).lines()
    assert lines[0] == "ferry: serving model 'm' on 1 worker(s)"
    assert lines[-1] == "  worker w0       127.0.0.1:2  pid 7"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_parser(parser.add_subparsers(), "serve")
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (("--workers", "1", "--prefill-workers", "1", "--decode-workers", "1"),
     "ferry serve: give either --workers N (aggregated workers) or --prefill-workers P"),
    (("--decode-workers", "1"), ("ferry serve: a disaggregated deployment needs prefill and "
                                "decode workers")),
    (("--prefill-workers", "1", "--decode-workers", "1", "--max-local-prefill-tokens", "-1"),
     "ferry serve: max_local_prefill_tokens must be an integer >= 0"),
])
def test_the_cli_refuses_bad_role_options_before_starting_anything(argv, message, capsys):
    assert serve_command.run(parse(*argv)) == 2
    assert capsys.readouterr().err.startswith(message)


def test_the_cli_defaults_are_the_configs():
    args = parse()
    assert (args.workers, args.prefill_workers, args.decode_workers) == (None, 0, 0)
    assert (args.max_local_prefill_tokens, args.max_prefill_queue_tokens) == (512, 16384)
