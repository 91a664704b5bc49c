"""``ferry replay TRACE.jsonl``: replay a Mooncake trace through the router and workers.

``--offline`` simulates the workers in this process on a virtual clock
(:mod:`orchestrator.replay.simulator`); without it the trace goes to a live local cluster of
mocker workers over gRPC and NATS on the wall clock (:mod:`orchestrator.replay.online`), which
the command starts and stops (also on Ctrl-C). Each is imported only when used. Prints a table
of the results; ``--json OUT`` also writes them as one JSON object.

``--prefill-workers P --decode-workers D`` replays a disaggregated deployment (offline:
:mod:`orchestrator.replay.disagg`; live: prefill and decode mocker workers with real KV
handles and pulls over gRPC): give both, not with ``--workers``; the disaggregation flags
need them, and the KV transfer model (``--kv-*``) applies to the offline replay only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from orchestrator.replay.config import TRANSFER_MODEL_OFFLINE_ONLY, ReplayConfig
from orchestrator.replay.trace_file import load_trace
from orchestrator.replay.transfer import KvTransferModel
from router.cost import CostConfig
from router.disagg import DisaggConfig
from router.types import RouterMode
from workers.mocker.timing import TimingModel

_D = ReplayConfig(trace=Path("-"))
_T = TimingModel()
_C = CostConfig()
_G = DisaggConfig()
_X = KvTransferModel()
_UNSET = object()  # a disaggregation flag not given (None is a value of some)
_TRANSFER_FLAGS = (("kv_bytes_per_token", "--kv-bytes-per-token"),
                   ("kv_transfer_gbps", "--kv-transfer-gbps"),
                   ("kv_transfer_latency_ms", "--kv-transfer-latency-ms"))
_DISAGG_FLAGS = (("max_local_prefill_tokens", "--max-local-prefill-tokens"),
                 ("max_prefill_queue_tokens", "--max-prefill-queue-tokens"), *_TRANSFER_FLAGS)


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="replay a Mooncake trace (offline simulation or live)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="Mooncake JSONL trace (timestamp ms, input_length, "
                   "output_length, hash_ids)")
    p.add_argument("--offline", action="store_true",
                   help="simulate the workers in-process on a virtual clock (mocker engines)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"aggregated workers (default {_D.workers})")
    p.add_argument("--prefill-workers", type=int, default=None,
                   help="disaggregated: prefill workers (with --decode-workers)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="disaggregated: decode workers (with --prefill-workers)")
    p.add_argument("--router", default=_D.router.value, choices=[m.value for m in RouterMode],
                   help="routing mode (default %(default)s)")
    p.add_argument("--speedup", type=float, default=_D.speedup,
                   help="divide the trace's arrival times by this (default %(default)s)")
    p.add_argument("--block-size", type=int, default=_D.block_size,
                   help="KV block size in tokens (default %(default)s)")
    p.add_argument("--num-blocks", type=int, default=_D.num_blocks,
                   help="KV blocks per worker (default %(default)s)")
    p.add_argument("--max-batched-tokens", "--max-num-batched-tokens", type=int,
                   dest="max_batched_tokens", default=_D.max_num_batched_tokens,
                   help="token budget of one engine step (default %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=_D.max_num_seqs,
                   help="most requests running at once per worker (default %(default)s)")
    t = p.add_argument_group("timing model (mocker): prefill_ms(T) = a*T^2 + b*T + c, "
                             "decode_ms(u) = max(1, p*u^2 + q*u + r)")
    for flag, field_name in (("--prefill-a", "a"), ("--prefill-b", "b"), ("--prefill-c", "c"),
                             ("--decode-p", "p"), ("--decode-q", "q"), ("--decode-r", "r")):
        t.add_argument(flag, type=float, default=getattr(_T, field_name),
                       help="default %(default)s")
    c = p.add_argument_group("router cost (kv, approx): prefill_weight * (uncached + queued "
                             "prefill blocks) + decode_weight * decode blocks; see router/cost.py")
    c.add_argument("--prefill-weight", type=float, default=_C.prefill_weight,
                   help="default %(default)s")
    c.add_argument("--decode-weight", type=float, default=_C.decode_weight,
                   help="default %(default)s")
    c.add_argument("--temperature", type=float, default=_C.temperature,
                   help="0: lowest cost wins; > 0: softmax sampling (default %(default)s)")
    c.add_argument("--busy-kv-usage", type=_optional_float, default=_C.busy_kv_usage,
                   help="skip workers at or above this KV usage, 'none': off "
                        "(default %(default)s)")
    c.add_argument("--busy-prefill-blocks", type=_optional_float,
                   default=_C.busy_prefill_blocks,
                   help="skip workers with this many prefill blocks queued, 'none': off "
                        "(default %(default)s)")
    d = p.add_argument_group("disaggregation (with --prefill-workers and --decode-workers; the "
                             "--kv-* transfer model with --offline only); see router/disagg.py "
                             "and orchestrator/replay/transfer.py")
    d.add_argument("--max-local-prefill-tokens", type=int, default=_UNSET,
                   help="prefill on the decode worker when at most this many prompt tokens "
                        f"are uncached there (default {_G.max_local_prefill_tokens})")
    d.add_argument("--max-prefill-queue-tokens", type=_optional_int, default=_UNSET,
                   help="prefill locally when the prefill pool has more queued prefill "
                        "tokens per worker than this, 'none': never by queue "
                        f"(default {_G.max_prefill_queue_tokens})")
    d.add_argument("--kv-bytes-per-token", type=int, default=_UNSET,
                   help="KV bytes of one token: 2 * layers * kv_heads * head_dim * dtype "
                        f"bytes (default {_X.bytes_per_token}: Llama-3-8B shape, bf16)")
    d.add_argument("--kv-transfer-gbps", type=float, default=_UNSET,
                   help=f"KV pull bandwidth, GB/s (default {_X.bandwidth_gb_s:g})")
    d.add_argument("--kv-transfer-latency-ms", type=float, default=_UNSET,
                   help=f"fixed cost of one KV pull, ms (default {_X.latency_ms:g})")
    p.add_argument("--limit", type=int, default=None,
                   help="replay only the first N requests of the trace")
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write the report as one JSON object to OUT")
    p.add_argument("--seed", type=int, default=_D.seed,
                   help="router tie-breaks / random picks and mocker sampling (default 0)")


def build_config(args: argparse.Namespace) -> ReplayConfig:
    """The :class:`ReplayConfig` of parsed arguments (ValueError on bad values)."""
    timing = TimingModel(a=args.prefill_a, b=args.prefill_b, c=args.prefill_c,
                         p=args.decode_p, q=args.decode_q, r=args.decode_r)
    cost = CostConfig(prefill_weight=args.prefill_weight, decode_weight=args.decode_weight,
                      temperature=args.temperature, busy_kv_usage=args.busy_kv_usage,
                      busy_prefill_blocks=args.busy_prefill_blocks)
    disagg = args.prefill_workers is not None or args.decode_workers is not None
    if disagg and args.workers is not None:
        raise ValueError("give either --workers N (aggregated workers) or --prefill-workers P "
                         "--decode-workers D (disaggregated), not both")
    given = [flag for name, flag in _DISAGG_FLAGS if getattr(args, name) is not _UNSET]
    if given and not disagg:
        raise ValueError(f"{', '.join(given)} only apply to a disaggregated replay: add "
                         "--prefill-workers P --decode-workers D")
    dcfg = DisaggConfig(
        max_local_prefill_tokens=_given(args.max_local_prefill_tokens,
                                        _G.max_local_prefill_tokens),
        max_prefill_queue_tokens=_given(args.max_prefill_queue_tokens,
                                        _G.max_prefill_queue_tokens))
    transfer = KvTransferModel(
        bytes_per_token=_given(args.kv_bytes_per_token, _X.bytes_per_token),
        bandwidth_gb_s=_given(args.kv_transfer_gbps, _X.bandwidth_gb_s),
        latency_ms=_given(args.kv_transfer_latency_ms, _X.latency_ms))
    return ReplayConfig(
        trace=args.trace, workers=_D.workers if args.workers is None else args.workers,
        prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
        router=args.router, speedup=args.speedup, block_size=args.block_size,
        num_blocks=args.num_blocks, max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_num_seqs, timing=timing, cost=cost,
        disagg=dcfg if disagg else None, transfer=transfer, limit=args.limit, seed=args.seed)


def _given(value, default):
    return default if value is _UNSET else value


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
        if not args.offline and any(getattr(args, name) is not _UNSET
                                    for name, _ in _TRANSFER_FLAGS):
            raise ValueError(TRANSFER_MODEL_OFFLINE_ONLY)
        requests = load_trace(config.trace, config.limit)  # a bad trace fails before imports
        if args.offline:
            from orchestrator.replay.simulator import replay_offline

            report = replay_offline(config, requests)
        else:
            from orchestrator.replay.online import run_online

            try:
                report = run_online(config, requests)
            except (RuntimeError, OSError) as e:  # the live cluster could not start or run
                print(f"ferry replay: the online replay failed: {e}", file=sys.stderr)
                return 1
    except ValueError as e:
        print(f"ferry replay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferry replay: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print(report.format_table())
    if args.json is not None:
        obj = report.to_dict()
        obj["config"] = _config_dict(config)
        try:
            args.json.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        except OSError as e:
            print(f"ferry replay: cannot write {args.json}: {e}", file=sys.stderr)
            return 1
    return 0


def _config_dict(config: ReplayConfig) -> dict:
    d = asdict(config)
    d["trace"] = str(config.trace)
    d["router"] = config.router.value
    d["cost"] = asdict(config.cost_config)
    d["disagg"] = asdict(config.disagg_config) if config.disaggregated else None
    return d
