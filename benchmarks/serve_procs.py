"""The server processes of benchmarks/serve_overhead.py, and how the benchmark runs them.

Each server is a plain subprocess (``python benchmarks/serve_procs.py worker|frontend ...``),
not a Ray actor, so that what is measured is the serving path alone.

Process protocol (child side / parent side):

- the child serves on 127.0.0.1, then prints one line ``READY <json>`` on stdout (the worker:
  its address; a frontend: its bound ports) and flushes; the parent waits for that line with a
  deadline and fails with the child's stderr when it does not come;
- the child stops on SIGTERM or SIGINT, and also when its stdin reaches end of file: the
  parent holds the write end of that pipe, so a parent that dies without cleaning up (kill -9)
  still takes its children down;
- the parent stops every child it started by pid (:meth:`Children.stop_all`): SIGTERM, a few
  seconds' grace, then SIGKILL.

The worker is a mocker engine (real scheduler, KV manager and block pool; no model) whose
timing model says every pass takes 1 ns (:func:`zero_latency_engine`), on a wall clock: each
step still sleeps (the shortest sleep the OS gives, tens of microseconds) and so releases the
GIL, as a real forward pass would. With ``--profile FILE`` a child runs under cProfile timed by its main thread's CPU time (on a
shared machine, wall time charges a syscall with the time other processes ran meanwhile) and
writes the stats at exit. The frontend is the real :class:`FrontendServer` (OpenAI
HTTP and ferry.v1 gRPC; KServe off). Several frontends share the same ports with
SO_REUSEPORT: the first binds free ports, the others bind the same ones. Event loops as in
``ferry serve`` (``--loop serve``): frontends on uvloop (orchestrator.serve.run_event_loop),
the worker on asyncio's own loop, like its Ray actor.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.frontend_process import stop_event

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
READY = "READY "

# Every pass costs max(1 ms, ...) before the speedup: 1 ns after it.
ZERO_TIMING = {"a": 0.0, "b": 0.0, "c": 0.0, "p": 0.0, "q": 0.0, "r": 0.0, "speedup": 1e6}


# ---------------------------------------------------------------------- shared by all sides

def load_model(spec: str):
    """The tokenizer and config of ``spec`` (a model folder, .gguf file or embedded name)."""
    from workers.embedded import resolve_model
    from workers.loader.tokenizer_loader import load_model_info

    return load_model_info(resolve_model(spec))


def served_name(spec: str, info) -> str:
    from workers.embedded import EMBEDDED_MODELS

    return spec if spec in EMBEDDED_MODELS else info.name


def zero_latency_engine(info, max_num_seqs: int = 512, num_blocks: int = 8192,
                        max_model_len: int = 2048):
    """A mocker LLMEngine with the vocabulary of ``info`` whose passes take ~0 s."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine
    from workers.mocker.clock import WallClock
    from workers.mocker.runner import MockerRunner
    from workers.mocker.timing import TimingModel

    max_len = min(max_model_len, info.config.max_position_embeddings)
    runner = MockerRunner(info.tokenizer.vocab_size, max_len, timing=TimingModel(**ZERO_TIMING),
                          clock=WallClock(), avoid_token_ids=info.tokenizer.eos_token_ids)
    config = EngineConfig(num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=8192, max_model_len=max_len)
    return LLMEngine(runner, config)


# ---------------------------------------------------------------------- child side

def _announce(payload: dict) -> None:
    sys.stdout.write(READY + json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _worker_main(args: argparse.Namespace) -> None:
    from workers.server.worker import WorkerConfig, WorkerServer

    info = load_model(args.model)
    engine = zero_latency_engine(info)
    config = WorkerConfig(worker_id=args.worker_id, model=served_name(args.model, info))
    if args.stream_interval_ms is not None:
        config = dataclasses.replace(config, stream_interval_s=args.stream_interval_ms / 1000.0)
    server = WorkerServer(engine, config)
    stop = stop_event()
    address = await server.start()
    _announce({"address": address, "pid": os.getpid()})
    await stop.wait()
    await server.stop(grace=0.5)


async def _frontend_main(args: argparse.Namespace) -> None:
    from orchestrator.frontend import Frontend, FrontendConfig, FrontendServer

    info = load_model(args.model)
    frontend = Frontend(info.tokenizer, FrontendConfig(model_name=served_name(args.model, info)))
    stop = stop_event()
    try:
        for i, address in enumerate(args.worker):
            await frontend.add_worker(f"w{i}", address)
        server = FrontendServer(frontend, host="127.0.0.1", http_port=args.http_port,
                                grpc_port=args.grpc_port, kserve_port=None,
                                reuse_port=args.reuse_port)
        ports = await server.start()
        try:
            _announce({"http": ports.http, "grpc": ports.grpc, "pid": os.getpid()})
            await stop.wait()
        finally:
            await server.stop()
    finally:
        await frontend.close()


def _child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--model", required=True)
    w.add_argument("--worker-id", default="w0")
    w.add_argument("--stream-interval-ms", type=float, default=None,
                   help="WorkerConfig.stream_interval_s in ms (default: WorkerConfig's)")
    f = sub.add_parser("frontend")
    f.add_argument("--model", required=True)
    f.add_argument("--worker", action="append", required=True, help="worker address")
    f.add_argument("--http-port", type=int, default=0)
    f.add_argument("--grpc-port", type=int, default=0)
    f.add_argument("--reuse-port", action="store_true")
    for sp in (w, f):
        sp.add_argument("--loop", choices=LOOPS, default="serve",
                        help="serve: as ferry serve runs it (frontends on uvloop, the worker "
                             "on asyncio's loop like its Ray actor); or force one")
        sp.add_argument("--profile", type=Path, default=None,
                        help="run under cProfile (main thread, CPU time) and write its stats "
                             "to this file at exit")
    args = parser.parse_args(argv)
    run = _worker_main if args.role == "worker" else _frontend_main
    profiler = None
    if args.profile is not None:
        import cProfile
        import time as _time

        profiler = cProfile.Profile(_time.thread_time)  # CPU time, not wall: see the docstring
        profiler.enable()
    try:
        run_loop(run(args), args.loop, args.role)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


LOOPS = ("serve", "asyncio", "uvloop")


def run_loop(coro, loop: str, role: str):
    """Run ``coro`` on the event loop ``loop`` names (see ``--loop``) for ``role``."""
    if loop == "uvloop" or (loop == "serve" and role == "frontend"):
        from orchestrator.serve import run_event_loop  # uvloop where installed

        return run_event_loop(coro)
    return asyncio.run(coro)


# ---------------------------------------------------------------------- parent side

@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid


class Children:
    """Every process the benchmark starts; :meth:`stop_all` ends them by pid."""

    def __init__(self, log_dir: Path) -> None:
        self.children: list[Child] = []
        self.log_dir = Path(log_dir)  # each child's stderr goes to <name>.log here

    def spawn(self, name: str, argv: list[str], ready_timeout_s: float | None = 60.0,
              env: dict | None = None) -> Child:
        """Start ``python argv...`` and wait for its READY line (None: do not wait)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, env=env)
        child = Child(name, proc, log_path)
        self.children.append(child)
        if ready_timeout_s is None:
            return child
        line = read_line(proc, ready_timeout_s)
        if line is None or not line.startswith(READY):
            self.stop(child)
            raise RuntimeError(f"{name} (pid {proc.pid}) did not start: got {line!r}; its "
                               f"log ({log_path}) ends with:\n{child.log_tail()}")
        child.info = json.loads(line[len(READY):])
        return child

    def stop(self, child: Child, grace_s: float = 5.0) -> None:
        proc = child.proc
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
            except ProcessLookupError:
                pass
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def stop_all(self) -> None:
        while self.children:
            child = self.children.pop()
            try:
                self.stop(child)
            except BaseException as exc:  # noqa: BLE001 - keep stopping the others
                if child.proc.poll() is None:
                    child.proc.kill()
                print(f"stopping {child.name} (pid {child.pid}) failed: {exc!r}",
                      file=sys.stderr)


def read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
    """The child's next stdout line, or None at EOF or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    out = proc.stdout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            byte = os.read(out.fileno(), 1)
            if not byte:
                return None
            if byte == b"\n":
                return buf.decode()
            buf += byte


def machine_busy_seconds() -> float:
    """CPU time all processes of this machine spent so far, all cores together (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    _child_main()
