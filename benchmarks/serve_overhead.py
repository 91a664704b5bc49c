"""What the serving path costs: streamed requests/s and the latency it adds, HTTP and gRPC.

With a mocker worker whose passes take ~0 s, everything between a client and the engine is
overhead: the OpenAI HTTP layer (aiohttp, SSE) or the ferry.v1 gRPC layer, the frontend
(tokenize, pick a worker, detokenize), the frontend -> worker gRPC stream, and the worker's
gRPC service around its AsyncEngine. For 1, 64 and 256 concurrent closed-loop streams of 16
tokens each (EOS ignored) this prints requests/s and p50 / p99 latency (send to last byte) per
path, and what each path adds over calling the same engine in-process (an
:class:`~workers.server.async_engine.AsyncEngine` in this process, same concurrency, same
run): ``+p50 = p50(path) - p50(in-process)``, likewise p99. It also prints the CPU time each
process spent per request inside the window (client, frontends, worker) and how many stream
messages a request took, which is where to look when the numbers are bad.

Processes, all on 127.0.0.1 (see benchmarks/serve_procs.py and benchmarks/serve_load.py):
one mocker worker (``serve_procs.py worker``: WorkerServer over a mocker LLMEngine, timing
model at 1 ns a pass), ``--frontends`` frontend processes (``serve_procs.py frontend``:
FrontendServer, OpenAI HTTP + ferry.v1 gRPC; several share the ports with SO_REUSEPORT), and
one load generator process per measurement (``serve_load.py``: aiohttp SSE client for
``/v1/completions`` (``--chat``: ``/v1/chat/completions``), or grpc.aio ``Ferry.Generate``).
They are plain subprocesses, not Ray actors, so that only the serving path is measured. Every
process started here is stopped by pid at the end, also on error or Ctrl-C (SIGTERM, then
SIGKILL after a grace period); children also exit when this process dies (their stdin closes).

Each measurement: ``--warmup`` seconds of load, then a ``--seconds`` window; bounded (a
request taking over 30 s is an error; a load generator that does not report within
warmup + seconds + 60 s is killed).

Target (the issue): >= 1,000 streamed requests/s at 64 concurrent streams on a 2-core machine,
p50 added latency < 5 ms.

Run:
    .venv/bin/python benchmarks/serve_overhead.py [--concurrency 1,64,256] [--seconds 5]
        [--paths inprocess,http,grpc] [--frontends 1] [--model smollm2] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serve_load import PROMPT, LoadResult, inprocess_load
from serve_procs import Children, cpu_seconds, load_model, read_line, zero_latency_engine

HERE = Path(__file__).resolve().parent
PATHS = ("inprocess", "http", "grpc")


@dataclass
class Cell:
    path: str
    concurrency: int
    result: LoadResult
    frontend_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0

    def per_request_ms(self, cpu_s: float) -> float:
        n = self.result.completed_in_window
        return cpu_s * 1000.0 / n if n else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))]


# ---------------------------------------------------------------------- measurements

def measure_inprocess(info, concurrency: int, args) -> Cell:
    prompt_ids = tuple(info.tokenizer.encode(PROMPT, add_special_tokens=True))
    result = asyncio.run(inprocess_load(zero_latency_engine(info), prompt_ids, concurrency,
                                        args.warmup, args.seconds, args.max_tokens))
    return Cell("inprocess", concurrency, result)


def measure_served(children: Children, path: str, target: str, concurrency: int, args,
                   frontends: list, worker) -> Cell:
    argv = [str(HERE / "serve_load.py"), "--path", path, "--target", target,
            "--concurrency", str(concurrency), "--warmup", str(args.warmup),
            "--seconds", str(args.seconds), "--max-tokens", str(args.max_tokens),
            "--channels", str(args.channels)]
    if args.chat:
        argv.append("--chat")
    if args.uvloop:
        argv.append("--uvloop")
    load = children.spawn(f"load-{path}-{concurrency}", argv, ready_timeout_s=None)
    deadline = time.monotonic() + args.warmup + args.seconds + 60.0
    servers = [worker, *frontends]
    cpu0: list[float] | None = None
    cpu1: list[float] | None = None
    result = None
    try:
        while result is None:
            line = read_line(load.proc, max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"the load generator {load.name} stopped or timed out; its "
                                   f"log ({load.log_path}) ends with:\n{load.log_tail()}")
            if line == "WINDOW start":
                cpu0 = [cpu_seconds(c.pid) for c in servers]
            elif line == "WINDOW end":
                cpu1 = [cpu_seconds(c.pid) for c in servers]
            elif line.startswith("RESULT "):
                result = LoadResult(**json.loads(line[len("RESULT "):]))
    finally:
        children.stop(load)
        children.children.remove(load)
    if cpu0 is None or cpu1 is None:
        raise RuntimeError(f"{load.name} reported no measuring window")
    used = [b - a for a, b in zip(cpu0, cpu1)]
    return Cell(path, concurrency, result, frontend_cpu_s=sum(used[1:]), worker_cpu_s=used[0])


def start_stack(children: Children, args) -> tuple:
    flag = ["--uvloop"] if args.uvloop else []
    interval = [] if args.stream_interval_ms is None else \
        ["--stream-interval-ms", str(args.stream_interval_ms)]
    worker = children.spawn("worker", [str(HERE / "serve_procs.py"), "worker",
                                       "--model", args.model, *interval, *flag])
    frontends = []
    http_port = grpc_port = 0
    for i in range(args.frontends):
        argv = [str(HERE / "serve_procs.py"), "frontend", "--model", args.model,
                "--worker", worker.info["address"], "--http-port", str(http_port),
                "--grpc-port", str(grpc_port), *flag]
        if args.frontends > 1:
            argv.append("--reuse-port")
        fe = children.spawn(f"frontend-{i}", argv)
        http_port, grpc_port = fe.info["http"], fe.info["grpc"]
        frontends.append(fe)
    return worker, frontends, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"


# ---------------------------------------------------------------------- report

def table(cells: list[Cell]) -> str:
    base = {c.concurrency: c for c in cells if c.path == "inprocess"}
    head = (f"{'path':<10} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'+p50 ms':>8} {'+p99 ms':>8} {'msg/req':>8} {'cpu ms/req: client':>19} "
            f"{'frontend':>9} {'worker':>7} {'errors':>7}")
    lines = [head, "-" * len(head)]
    for c in cells:
        r = c.result
        p50, p99 = percentile(r.latencies_ms, 50), percentile(r.latencies_ms, 99)
        b = base.get(c.concurrency)
        if b is not None and c.path != "inprocess":
            add50 = f"{p50 - percentile(b.result.latencies_ms, 50):8.2f}"
            add99 = f"{p99 - percentile(b.result.latencies_ms, 99):8.2f}"
        else:
            add50 = add99 = f"{'-':>8}"
        if c.path == "inprocess":
            cpu = f"{'(one process)':>19} {'-':>9} {'-':>7}"
        else:
            cpu = (f"{c.per_request_ms(r.client_cpu_s):19.2f} "
                   f"{c.per_request_ms(c.frontend_cpu_s):9.2f} "
                   f"{c.per_request_ms(c.worker_cpu_s):7.2f}")
        lines.append(f"{c.path:<10} {c.concurrency:>5} {r.rps:8.0f} {p50:8.2f} {p99:8.2f} "
                     f"{add50} {add99} {r.messages_per_request:8.1f} {cpu} {r.errors:>7}")
    errors = [f"  {c.path} x {c.concurrency}: {c.result.first_error}" for c in cells
              if c.result.first_error]
    if errors:
        lines += ["first error per measurement:", *errors]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2",
                   help="whose tokenizer and vocabulary to use (folder, .gguf or embedded name)")
    p.add_argument("--concurrency", default="1,64,256", help="comma-separated stream counts")
    p.add_argument("--paths", default=",".join(PATHS), help=f"some of {','.join(PATHS)}")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each window")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--frontends", type=int, default=1,
                   help="frontend processes sharing the ports (SO_REUSEPORT)")
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="the worker's stream_interval_s, in ms (default: WorkerConfig's)")
    p.add_argument("--channels", type=int, default=4, help="gRPC client connections")
    p.add_argument("--chat", action="store_true", help="HTTP: /v1/chat/completions")
    p.add_argument("--uvloop", action="store_true", help="run every process on uvloop")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.paths = [x for x in args.paths.split(",") if x]
    bad = [x for x in args.paths if x not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; use some of {','.join(PATHS)}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency takes positive integers, e.g. 1,64,256")
    if args.frontends < 1 or args.max_tokens < 1 or args.seconds <= 0 or args.warmup < 0:
        p.error("--frontends and --max-tokens must be >= 1, --seconds > 0, --warmup >= 0")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on kill as on Ctrl-C
    info = load_model(args.model)
    cells: list[Cell] = []
    log_dir = Path(tempfile.mkdtemp(prefix="ferry-serve-overhead-"))
    children = Children(log_dir)
    try:
        if "inprocess" in args.paths:
            for n in args.concurrency:
                cells.append(measure_inprocess(info, n, args))
                print(f"inprocess x {n}: {cells[-1].result.rps:.0f} req/s", file=sys.stderr)
        served = [p for p in args.paths if p != "inprocess"]
        if served:
            worker, frontends, http, grpc = start_stack(children, args)
            for path in served:
                for n in args.concurrency:
                    cell = measure_served(children, path, http if path == "http" else grpc,
                                          n, args, frontends, worker)
                    cells.append(cell)
                    print(f"{path} x {n}: {cell.result.rps:.0f} req/s", file=sys.stderr)
    finally:
        children.stop_all()
    print(f"serving overhead: {args.max_tokens} tokens/request, {args.frontends} frontend "
          f"process(es), window {args.seconds:g} s after {args.warmup:g} s warmup, "
          f"uvloop {'on' if args.uvloop else 'off'}, logs in {log_dir}")
    print(table(cells))
    if args.json:
        args.json.write_text(json.dumps([{**asdict(c), "rps": c.result.rps} for c in cells]))
    return 1 if any(c.result.errors for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
