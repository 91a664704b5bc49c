"""``ferry serve``: run a deployment (see orchestrator/serve.py) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from router.disagg import DisaggConfig
from router.types import RouterMode
from workers.embedded import DEFAULT_MODEL
from workers.engine.config import EngineConfig
from workers.server.kv_transport import KV_TRANSPORTS

_D = EngineConfig()
_DG = DisaggConfig()


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="serve a model: OpenAI HTTP, ferry gRPC and KServe gRPC")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model folder, .gguf file, or embedded name (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="aggregated workers (default 1)")
    p.add_argument("--prefill-workers", type=int, default=0, metavar="P",
                   help="disaggregated: P prefill workers (with --decode-workers, instead of "
                        "--workers)")
    p.add_argument("--decode-workers", type=int, default=0, metavar="D",
                   help="disaggregated: D decode workers")
    p.add_argument("--max-local-prefill-tokens", type=int,
                   default=_DG.max_local_prefill_tokens, metavar="N",
                   help="disaggregated: prefill on the decode worker when at most N prompt "
                        "tokens are not cached there (default %(default)s)")
    p.add_argument("--max-prefill-queue-tokens", type=int,
                   default=_DG.max_prefill_queue_tokens, metavar="N",
                   help="disaggregated: prefill on the decode worker while the prefill workers "
                        "have more than N prompt tokens queued each (0: no limit; default "
                        "%(default)s)")
    p.add_argument("--kv-transport", default="auto", choices=list(KV_TRANSPORTS),
                   help="disaggregated: how KV blocks move from prefill to decode workers. "
                        "auto: shared memory between workers on one host (CUDA IPC for GPU "
                        "caches), gRPC between hosts; grpc; shm; cuda-ipc (default "
                        "%(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--kserve-grpc-port", type=int, default=8002)
    p.add_argument("--frontends", type=int, default=1, metavar="N",
                   help="frontend processes sharing the ports, each with its own router "
                        "replica (one Python process uses at most one core; default 1)")
    p.add_argument("--nats-url", default=None,
                   help="use this NATS (JetStream on); default: start our own nats-server")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster ('auto' or HOST:PORT); default: a local Ray")
    p.add_argument("--router", default=RouterMode.KV.value,
                   choices=[m.value for m in RouterMode],
                   help="kv: to the worker holding the longest prefix, weighed against load "
                        "(KV events over NATS); approx: predicted from past routing; "
                        "round_robin; random (default: %(default)s)")
    p.add_argument("--runner", default="torch", choices=["torch", "mocker"],
                   help="'mocker': timing model without weights (for load tests)")
    p.add_argument("--block-size", type=int, default=_D.block_size,
                   help="tokens per KV block, workers and router alike (default %(default)s)")
    p.add_argument("--hash-seed", type=int, default=_D.hash_seed,
                   help="block-hash seed, workers and router alike (default %(default)s)")
    p.add_argument("--kv-cache-memory-mib", type=int, default=512,
                   help="KV cache per torch worker in MiB (default 512)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per worker (overrides --kv-cache-memory-mib)")
    p.add_argument("--max-num-seqs", type=int, default=_D.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=_D.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--print-json", action="store_true",
                   help="also print the endpoints as one JSON line prefixed 'FERRY_READY '")


def run(args: argparse.Namespace) -> int:
    if args.address is None:
        # Ray reads these when it is imported: a single-machine Ray of ours stays on 127.0.0.1.
        from orchestrator.ray_cluster import LOCAL_ENV

        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    from orchestrator.serve import ServeConfig, run_serve

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.workers is not None and (args.prefill_workers or args.decode_workers):
            raise ValueError("give either --workers N (aggregated workers) or --prefill-workers P "
                             "--decode-workers D (disaggregated), not both")
        disagg = DisaggConfig(max_local_prefill_tokens=args.max_local_prefill_tokens,
                              max_prefill_queue_tokens=args.max_prefill_queue_tokens or None)
        engine = EngineConfig(
            block_size=args.block_size, num_blocks=args.num_blocks or _D.num_blocks,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, hash_seed=args.hash_seed)
        cfg = ServeConfig(
            model=args.model, workers=1 if args.workers is None else args.workers,
            prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
            disagg=disagg, host=args.host, http_port=args.http_port,
            grpc_port=args.grpc_port, kserve_grpc_port=args.kserve_grpc_port,
            nats_url=args.nats_url, ray_address=args.address, router=args.router,
            runner=args.runner, engine=engine, frontends=args.frontends,
            kv_transport=args.kv_transport,
            kv_cache_bytes=None if args.num_blocks else args.kv_cache_memory_mib * 2**20)
    except ValueError as exc:
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 2

    def ready(endpoints) -> None:
        print("\n".join(endpoints.lines()), flush=True)
        if args.print_json:
            print("FERRY_READY " + endpoints.json(), flush=True)
        print("ferry: press Ctrl-C to stop", flush=True)

    try:
        run_serve(cfg, ready)
    except (ValueError, OSError) as exc:
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 1
    print("ferry: stopped", flush=True)
    return 0
