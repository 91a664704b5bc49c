"""The extra frontend processes of ``ferry serve --frontends N``.

One Python process serves at most one core, so ``ferry serve`` can run N frontends: its own
(frontend 0) and N - 1 child processes. Each is a whole frontend (OpenAI HTTP, ferry.v1
gRPC, KServe gRPC) with its own router replica (orchestrator/routing/: replicas share their
in-flight load over NATS), dialing every worker itself. All bind the same ports with
SO_REUSEPORT, and the kernel spreads the client connections over them.

Protocol (parent side / child side):

- the parent binds the ports first (frontend 0, ``reuse_port=True``), then starts each child
  as ``python -m orchestrator.frontend_process`` with pipes for stdin and stdout, and writes
  one :class:`FrontendSpec` to its stdin (8-byte length, then the pickle: the tokenizer
  travels in it, so a child imports neither torch nor Ray);
- the child builds its frontend exactly as the parent did (``serving_frontend``), binds the
  parent's ports, prints ``READY <json>`` (its pid) on stdout and serves;
- the parent waits for every READY line within ``start_timeout_s``; a child that fails or is
  late is stopped and ``start`` raises with the end of its stderr;
- the child stops (in-flight requests get their grace, then it closes its worker channels and
  its router) on SIGTERM or SIGINT, and when its stdin reaches end of file, so children never
  outlive a parent that was killed;
- the parent stops each child by pid: SIGTERM, ``grace_s`` seconds, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

READY = "READY "
_LENGTH = struct.Struct(">Q")


@dataclass(frozen=True)
class FrontendSpec:
    """What a child frontend needs: everything ``serving_frontend`` took, and the ports."""

    cfg: object  # orchestrator.serve.ServeConfig
    tokenizer: object  # workers.tokenizer.Tokenizer (picklable)
    workers: tuple  # orchestrator.worker_actor.WorkerEndpoint, ...
    nats_url: str | None
    http_port: int
    grpc_port: int
    kserve_port: int
    index: int  # 1 .. N-1 (the parent is frontend 0)


# ---------------------------------------------------------------------- parent side


class FrontendProcesses:
    """Child frontends started and stopped by pid (see the module docstring)."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self._log_dir = log_dir

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, specs: list[FrontendSpec], start_timeout_s: float = 120.0) -> list[int]:
        """Start one child per spec and wait until all serve; their pids."""
        try:
            for spec in specs:
                self.procs.append(self._spawn(spec))
            deadline = time.monotonic() + start_timeout_s
            for spec, proc in zip(specs, self.procs):
                line = _read_line(proc, max(0.0, deadline - time.monotonic()))
                if line is None or not line.startswith(READY):
                    raise RuntimeError(f"frontend {spec.index} (pid {proc.pid}) did not start "
                                       f"within {start_timeout_s:g}s; it printed {line!r}"
                                       f"{_stderr_tail(proc)}")
        except BaseException:
            self.stop()
            raise
        return self.pids

    def _spawn(self, spec: FrontendSpec) -> subprocess.Popen:
        payload = pickle.dumps(spec)
        stderr = subprocess.PIPE if self._log_dir is None else \
            open(self._log_dir / f"frontend-{spec.index}.log", "wb")  # noqa: SIM115
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, os.path.join(root, "proto"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.frontend_process"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                env=env, start_new_session=False)
        if stderr is not subprocess.PIPE:
            stderr.close()
        proc.stdin.write(_LENGTH.pack(len(payload)) + payload)
        proc.stdin.flush()  # the pipe stays open: closing it tells the child to stop
        return proc

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child, wait ``grace_s``, SIGKILL the rest; reap them all."""
        procs, self.procs = self.procs, []
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("frontend pid %d did not stop within %.0fs; killing it", proc.pid,
                            grace_s)
                proc.kill()
                proc.wait(5.0)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str | None:
    """The child's next stdout line, or None at end of file or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            byte = os.read(fd, 1)
            if not byte:
                return None
            if byte == b"\n":
                return buf.decode(errors="replace")
            buf += byte


def _stderr_tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    if proc.stderr is None:
        return ""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5.0)
    try:
        return "; its stderr ends with:\n" + proc.stderr.read().decode(errors="replace")[-chars:]
    except (OSError, ValueError):
        return ""


# ---------------------------------------------------------------------- child side


def _read_spec() -> FrontendSpec:
    head = os.read(0, _LENGTH.size)
    while len(head) < _LENGTH.size:
        more = os.read(0, _LENGTH.size - len(head))
        if not more:
            raise SystemExit("frontend_process: no spec on stdin (run by ferry serve only)")
        head += more
    (n,) = _LENGTH.unpack(head)
    parts, left = [], n
    while left:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            raise SystemExit("frontend_process: the spec on stdin is truncated")
        parts.append(chunk)
        left -= len(chunk)
    return pickle.loads(b"".join(parts))


def stop_event() -> asyncio.Event:
    """Set on SIGTERM / SIGINT, or when the parent closes our stdin (or dies)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        try:
            while os.read(0, 4096):  # not sys.stdin: a buffered reader blocked here breaks exit
                pass
        except OSError:
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    return stop


async def serve_child(spec: FrontendSpec) -> None:
    from orchestrator.frontend.server import FrontendServer
    from orchestrator.serve import serving_frontend

    stop = stop_event()
    cfg = spec.cfg
    async with serving_frontend(cfg, spec.tokenizer, spec.workers, spec.nats_url) as (fe, _):
        server = FrontendServer(fe, host=cfg.host, http_port=spec.http_port,
                                grpc_port=spec.grpc_port, kserve_port=spec.kserve_port,
                                reuse_port=True)
        await server.start()
        try:
            sys.stdout.write(READY + json.dumps({"pid": os.getpid(), "index": spec.index})
                             + "\n")
            sys.stdout.flush()
            await stop.wait()
        finally:
            await server.stop()


def main() -> None:
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s frontend-%(process)d %(name)s: %(message)s")
    spec = _read_spec()
    from orchestrator.serve import run_event_loop

    run_event_loop(serve_child(spec))


if __name__ == "__main__":
    main()
