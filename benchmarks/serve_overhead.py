"""What the serving path costs: streamed requests/s and the latency it adds, HTTP and gRPC.

With a mocker worker whose passes take ~0 s, everything between a client and the engine is
overhead: the OpenAI HTTP layer (aiohttp, SSE) or the ferry.v1 gRPC layer, the frontend
(tokenize, pick a worker, detokenize), the frontend -> worker GenerateStream, and the
worker's service around its AsyncEngine. The baseline is the same engine called in-process
(an :class:`~workers.server.async_engine.AsyncEngine` in this process), measured in the same
run. Each request streams 16 tokens (EOS ignored) and is read to its end and checked.

Two measurements per path and concurrency (1, 64 and 256 streams by default):

1. Throughput, closed loop: every stream sends its next request as soon as the previous one
   ended. Prints requests/s, p50 / p99 latency (send to last byte), the stream messages a
   request took, and the CPU time each process spent per request inside the window (load
   generator, frontends, worker; in-process: that one process, engine thread included),
   which is where to look when the numbers are bad, and ``others``: how many cores the
   machine's other processes (not this benchmark's) kept busy meanwhile, from /proc/stat.
   On a shared machine the throughput is only as good as the cores that were left.
2. Added latency at equal load: the same streams paced at ``--rate`` requests/s in all
   (serve_load.py: each request is due at a fixed time and its latency counts from then), for
   the in-process engine and for each path; ``+p50 = p50(path) - p50(in-process)``, likewise
   p99. A closed loop cannot measure this: at saturation its latency is streams / throughput
   (Little's law), so it only restates the throughput. With one stream there is no load to
   equalise: its added latency is that of the closed loop.

Target (issue 3): >= 1,000 streamed requests/s at 64 concurrent streams on this 2-core
machine, p50 added latency < 5 ms, for HTTP and gRPC; the last lines say whether it is met,
with the cores other processes took and a CPU-bound estimate (cores / CPU ms per request).

Where the time goes (64 streams, nothing else running): the engine itself ~0.4-0.55 ms of
CPU per request; the load generator ~0.05-0.15; a frontend ~0.2 (saturated) to ~0.4 (at
1,000 requests/s) over gRPC; the worker ~0.3-0.85 (the engine at the batch it gets, plus its
GenerateStream: one message per frontend request, at most one per ~1 ms of output). Costs
per stream message are what the design avoids: a frontend-worker gRPC call per request used
to cost ~0.5 ms on each side (hence GenerateStream), every SSE write or gRPC message ~0.1 ms
on the sender and the reader (hence 20 ms stream pacing and fewer, coalesced writes). A slow
frontend also starves the engine of batch (requests wait in the frontend instead), which
makes the worker dearer per request: the numbers move together. At 1,000 requests/s about
half the added latency is the engine itself running slower than in-process (it shares the
two cores with the frontend and the load generator), the rest the hops between processes.

No grpc.aio on the serving path: every operation of a grpc.aio call (accepting it, reading
the request, each message, the status) completes on grpc's poller thread, which wakes the
event loop through a socket: ~0.4 ms of CPU a call at 1,000 calls/s for a bare server
streaming two messages. ferry.rpc (proto/ferry/rpc: HTTP/2 and the gRPC wire format on the
event loop, ~0.09 ms for the same call) serves the frontends' ferry.v1 API, runs the
workers' grpc.aio servicers (AioCompatServer), and is the frontends' GenerateStream client
(BidiCall). Measured in one session (medians of paired runs, ``--paths inprocess,grpc
--concurrency 64 --seconds 4``): all grpc.aio, 1,500-1,900 requests/s closed loop, +p50
~4.5-5.7 ms at 1,000 requests/s; ferry.rpc in the frontend only (server and GenerateStream
client), 2,800-3,100 requests/s, +p50 ~3.2 (frontend CPU at 1,000 requests/s 0.68 -> 0.40 ms
a request; six runs from 2.6 to 5.8 ms); ferry.rpc in the worker too, 3,100-3,500
requests/s, +p50 1.6-2.0 ms in six rounds. The servers set TCP_NODELAY on every
connection themselves: a listening socket made without IPPROTO_TCP gets no NODELAY from
asyncio, and small frames then waited ~30 ms for delayed ACKs. Runs of the same code still
vary on this 2-core VM: ``--rounds`` takes the median of several.

Processes, all on 127.0.0.1 (see benchmarks/serve_procs.py and benchmarks/serve_load.py):
one mocker worker (``serve_procs.py worker``: WorkerServer over a mocker LLMEngine, timing
model at 1 ns a pass), ``--frontends`` frontend processes (``serve_procs.py frontend``:
FrontendServer, OpenAI HTTP + ferry.v1 gRPC; several share the ports with SO_REUSEPORT, as
``ferry serve --frontends N`` runs them), and one load generator process per measurement
(``serve_load.py``; by default the cheap clients of benchmarks/serve_clients.py, ``--client
lib`` for aiohttp / grpc.aio). They are plain subprocesses, not Ray actors, so that only the
serving path is measured, and all share this machine's cores. Every process started here is
stopped by pid at the end, also on error or Ctrl-C (SIGTERM, then SIGKILL after a grace
period); children also exit when this process dies (their stdin closes).

Each measurement: ``--warmup`` seconds of load, then a ``--seconds`` window; bounded (a
request taking over 30 s is an error; a load generator that does not report within
warmup + seconds + 60 s is killed).

Run:
    .venv/bin/python benchmarks/serve_overhead.py [--concurrency 1,64,256] [--seconds 5]
        [--rate 1000] [--paths inprocess,http,grpc] [--frontends 1] [--loop serve]
        [--stream-interval-ms 20] [--client raw|lib] [--model smollm2] [--rounds 3]

``--rounds N``: the equal-load latency at 64 streams is measured N times (in-process, then
each path, in turn) and the verdict takes the median +p50 of the rounds, since single runs
vary by a few milliseconds on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from serve_load import PROMPT, LoadResult, inprocess_load
from serve_procs import (
    Children,
    cpu_seconds,
    load_model,
    machine_busy_seconds,
    read_line,
    zero_latency_engine,
)
from serve_report import (
    TARGET_CONCURRENCY,
    TARGET_RPS,
    Cell,
    latency_rows,
    latency_table,
    throughput_table,
    verdict,
)

HERE = Path(__file__).resolve().parent
PATHS = ("inprocess", "http", "grpc")
_LOOPS = {"serve": "loops as in ferry serve (frontends and load generator uvloop, worker "
                   "asyncio)",
          "asyncio": "asyncio loops everywhere", "uvloop": "uvloop everywhere"}


# ---------------------------------------------------------------------- measurements

def measure_inprocess(info, concurrency: int, rate: float, args) -> Cell:
    prompt_ids = tuple(info.tokenizer.encode(PROMPT, add_special_tokens=True))
    busy: dict[str, float] = {}

    def mark(what: str) -> None:
        busy[what] = machine_busy_seconds()

    result = asyncio.run(inprocess_load(zero_latency_engine(info), prompt_ids, concurrency,
                                        args.warmup, args.seconds, args.max_tokens, rate=rate,
                                        on_mark=mark))
    others = busy["end"] - busy["start"] - result.client_cpu_s
    return Cell("inprocess", concurrency, rate, result, others_cores=others / args.seconds)


def measure_served(children: Children, path: str, target: str, concurrency: int, rate: float,
                   args, frontends: list, worker) -> Cell:
    argv = [str(HERE / "serve_load.py"), "--path", path, "--target", target,
            "--concurrency", str(concurrency), "--warmup", str(args.warmup),
            "--seconds", str(args.seconds), "--max-tokens", str(args.max_tokens),
            "--channels", str(args.channels), "--client", args.client, "--rate", str(rate)]
    if args.chat:
        argv.append("--chat")
    argv += ["--loop", args.loop]
    name = f"load-{path}-{concurrency}-{rate:g}"
    result_path = children.log_dir / f"{name}.json"
    argv += ["--result", str(result_path)]
    start = time.monotonic()
    load = children.spawn(name, argv, ready_timeout_s=None)
    deadline = start + args.warmup + args.seconds + 60.0
    servers = [worker, *frontends]
    cpu0: list[float] | None = None
    cpu1: list[float] | None = None
    busy0 = busy1 = 0.0
    seen: list[str] = []
    try:
        while "WINDOW end" not in seen:
            line = read_line(load.proc, max(0.0, deadline - time.monotonic()))
            if line is None:
                break
            seen.append(line)
            if line == "WINDOW start":
                cpu0 = [cpu_seconds(c.pid) for c in servers]
                busy0 = machine_busy_seconds()
            elif line == "WINDOW end":
                cpu1 = [cpu_seconds(c.pid) for c in servers]
                busy1 = machine_busy_seconds()
        try:  # the in-flight requests end within their timeout (30 s), then it writes the file
            code = load.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        if code != 0 or not result_path.exists() or cpu1 is None:
            raise RuntimeError(
                f"the load generator {load.name} failed (exit code {code} after "
                f"{time.monotonic() - start:.1f} s; it printed {seen!r}); its log "
                f"({load.log_path}) ends with:\n{load.log_tail()}")
        result = LoadResult(**json.loads(result_path.read_text()))
    finally:
        children.stop(load)
        children.children.remove(load)
    if cpu0 is None or cpu1 is None:
        raise RuntimeError(f"{load.name} reported no measuring window")
    used = [b - a for a, b in zip(cpu0, cpu1)]
    others = busy1 - busy0 - sum(used) - result.client_cpu_s
    return Cell(path, concurrency, rate, result, frontend_cpu_s=sum(used[1:]),
                worker_cpu_s=used[0], others_cores=others / args.seconds)


def start_stack(children: Children, args) -> tuple:
    flag = ["--loop", args.loop]

    def profile(name: str) -> list[str]:
        return [] if args.profile_dir is None else \
            ["--profile", str(args.profile_dir / f"{name}.prof")]

    interval = [] if args.stream_interval_ms is None else \
        ["--stream-interval-ms", str(args.stream_interval_ms)]
    worker = children.spawn("worker", [str(HERE / "serve_procs.py"), "worker",
                                       "--model", args.model, *interval, *flag,
                                       *profile("worker")])
    frontends = []
    http_port = grpc_port = 0
    for i in range(args.frontends):
        argv = [str(HERE / "serve_procs.py"), "frontend", "--model", args.model,
                "--worker", worker.info["address"], "--http-port", str(http_port),
                "--grpc-port", str(grpc_port), *flag, *profile(f"frontend-{i}")]
        if args.frontends > 1:
            argv.append("--reuse-port")
        fe = children.spawn(f"frontend-{i}", argv)
        http_port, grpc_port = fe.info["http"], fe.info["grpc"]
        frontends.append(fe)
    return worker, frontends, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2",
                   help="whose tokenizer and vocabulary to use (folder, .gguf or embedded name)")
    p.add_argument("--concurrency", default="1,64,256", help="comma-separated stream counts")
    p.add_argument("--rate", type=float, default=TARGET_RPS,
                   help="requests/s of the equal-load latency runs (0: skip them)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"some of {','.join(PATHS)}")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each window")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--frontends", type=int, default=1,
                   help="frontend processes sharing the ports (SO_REUSEPORT), as ferry serve "
                        "--frontends N runs them (default 1: on 2 cores one frontend batches "
                        "its work better than two halves do)")
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="the worker's stream_interval_s, in ms (default: WorkerConfig's)")
    p.add_argument("--channels", type=int, default=4, help="gRPC client connections")
    p.add_argument("--client", choices=("raw", "lib"), default="raw",
                   help="load generator clients: raw (serve_clients.py) or aiohttp / grpc.aio")
    p.add_argument("--chat", action="store_true", help="HTTP: /v1/chat/completions")
    p.add_argument("--loop", choices=("serve", "asyncio", "uvloop"), default="serve",
                   help="event loops: serve (default) as ferry serve runs them: frontends on "
                        "uvloop, the worker on asyncio's (like its Ray actor), the load "
                        "generator on uvloop; or that loop everywhere")
    p.add_argument("--rounds", type=int, default=3,
                   help="equal-load latency at 64 streams measured this many times, each "
                        "in-process then every path; the verdict takes the median +p50 "
                        "(the tables show the first round)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="run the worker and frontends under cProfile; stats go here")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.paths = [x for x in args.paths.split(",") if x]
    bad = [x for x in args.paths if x not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; use some of {','.join(PATHS)}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency takes positive integers, e.g. 1,64,256")
    if args.frontends < 1 or args.max_tokens < 1 or args.seconds <= 0 or args.warmup < 0 \
            or args.rate < 0 or args.rounds < 1:
        p.error("--frontends, --max-tokens and --rounds must be >= 1, --seconds > 0, --warmup "
                "and --rate >= 0")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def later_rounds(args, info, children: Children, served: list[str], targets: tuple,
                 frontends: list, worker) -> dict[str, list[float]]:
    """+p50 at the target load of rounds 2..N (in-process, then each served path)."""
    more: dict[str, list[float]] = {}
    if not args.rate or TARGET_CONCURRENCY not in args.concurrency \
            or "inprocess" not in args.paths:
        return more
    n, rate = TARGET_CONCURRENCY, args.rate
    for r in range(2, args.rounds + 1):
        base = measure_inprocess(info, n, rate, args)
        for path in served:
            cell = measure_served(children, path, targets[0] if path == "http" else targets[1],
                                  n, rate, args, frontends, worker)
            more.setdefault(path, []).append(cell.p50 - base.p50)
            print(f"round {r}: {path} x {n} at {rate:g} req/s: +p50 "
                  f"{cell.p50 - base.p50:.2f} ms", file=sys.stderr)
    return more


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on kill as on Ctrl-C
    info = load_model(args.model)
    closed: list[Cell] = []
    paced: list[Cell] = []
    more: dict[str, list[float]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="ferry-serve-overhead-"))
    children = Children(log_dir)
    loads = [(n, 0.0) for n in args.concurrency]
    if args.rate:
        loads += [(n, args.rate) for n in args.concurrency if n > 1]

    def note(cell: Cell) -> None:
        (paced if cell.rate else closed).append(cell)
        how = f"at {cell.rate:g} req/s" if cell.rate else "closed loop"
        print(f"{cell.path} x {cell.concurrency} {how}: {cell.result.rps:.0f} req/s, "
              f"p50 {cell.p50:.2f} ms", file=sys.stderr)

    try:
        if "inprocess" in args.paths:
            for n, rate in loads:
                note(measure_inprocess(info, n, rate, args))
        served = [p for p in args.paths if p != "inprocess"]
        if served:
            worker, frontends, http, grpc = start_stack(children, args)
            for path in served:
                for n, rate in loads:
                    note(measure_served(children, path, http if path == "http" else grpc,
                                        n, rate, args, frontends, worker))
            more = later_rounds(args, info, children, served, (http, grpc), frontends, worker)
    finally:
        children.stop_all()
    if args.stream_interval_ms is None:
        from workers.server.worker import WorkerConfig

        default = WorkerConfig.__dataclass_fields__["stream_interval_s"].default
        interval = f"{default * 1000:g} ms (WorkerConfig's default)"
    else:
        interval = f"{args.stream_interval_ms:g} ms"
    print(f"serving overhead: {args.max_tokens} tokens/request, {args.frontends} frontend "
          f"process(es), stream interval {interval}, {args.client} clients, "
          f"{_LOOPS[args.loop]}, windows of {args.seconds:g} s after "
          f"{args.warmup:g} s warmup; logs in {log_dir}")
    print("\nthroughput (closed loop):")
    print(throughput_table(closed))
    rows = latency_rows(closed, paced)
    print("\nadded latency at equal load (1 stream: closed loop; more: paced):")
    print(latency_table(rows))
    errors = [f"  {c.path} x {c.concurrency}: {c.result.first_error}" for c in closed + paced
              if c.result.first_error]
    if errors:
        print("first error per measurement:", *errors, sep="\n")
    lines = verdict(closed, rows, more)
    if lines:
        print()
        print(*lines, sep="\n")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(c), "rps": c.result.rps}
                                         for c in closed + paced]))
    return 1 if any(c.result.errors for c in closed + paced) else 0


if __name__ == "__main__":
    sys.exit(main())
