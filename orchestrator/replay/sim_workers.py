"""The offline replays' workers: mocker engines on virtual clocks, stepped by an event loop.

A :class:`SimWorker` is one :class:`~workers.engine.engine.LLMEngine` over a
:class:`~workers.mocker.runner.MockerRunner` with its own
:class:`~workers.mocker.clock.VirtualClock` (prefix caching on, the router's block size and
hash seed). The loop that owns it (:mod:`orchestrator.replay.simulator`,
:mod:`orchestrator.replay.disagg`):

- :meth:`SimWorker.start_step` at ``t`` when it is idle with unfinished requests: its clock
  jumps to ``t``, ``engine.step()`` runs, and the returned completion time is ``t`` plus the
  mocker's modelled duration. The worker is busy until then.
- :meth:`SimWorker.finish_step` at that completion time: the step's result (outputs, KV
  event batch) is handed to the loop, which emits it at that time.
- :meth:`SimWorker.call` for work a live worker does on its engine thread *between* steps
  (``AsyncEngine.call``: a KV import's reservation and commit, a handle's release): it runs
  at once on an idle worker, else when its running step completes (:meth:`run_calls`, in the
  order the calls were made), before its next step starts.

:func:`mocker_engine` builds a worker's engine on any clock (the online replay's run on the
wall clock); :func:`drain_problems` says what is left on an engine at the end of a replay.
"""

from __future__ import annotations

from collections.abc import Callable

from kvcache.wire import LoadReport
from orchestrator.replay.config import ReplayConfig
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine, StepResult
from workers.mocker.clock import Clock, VirtualClock
from workers.mocker.runner import MockerRunner
from workers.server.worker import build_load_report

EngineCall = Callable[[float], None]  # run on a worker's engine between steps, at time t


class SimWorker:
    """One mocker worker of an offline replay (see the module docstring)."""

    __slots__ = ("busy", "calls", "clock", "engine", "index", "pending", "worker_id")

    def __init__(self, index: int, worker_id: str, engine: LLMEngine, clock: VirtualClock
                 ) -> None:
        self.index = index
        self.worker_id = worker_id
        self.engine = engine
        self.clock = clock
        self.busy = False
        self.pending: StepResult | None = None  # the step running now
        self.calls: list[EngineCall] = []  # waiting for the running step to complete

    def start_step(self, t: float) -> float:
        """Run one engine step starting at ``t``; returns its completion time."""
        self.clock.advance_to(t)
        res = self.engine.step()
        if res.num_scheduled == 0 and not res.outputs:
            raise RuntimeError(f"{self.worker_id} has unfinished requests but its step "
                               f"scheduled nothing (scheduler bug); stats: {res.stats!r}")
        self.pending = res
        self.busy = True
        return self.clock.now()

    def finish_step(self) -> StepResult:
        res = self.pending
        if res is None:
            raise RuntimeError(f"{self.worker_id} has no step running")
        self.pending = None
        self.busy = False
        return res

    def call(self, fn: EngineCall, t: float) -> None:
        """Run ``fn(t)`` now when idle, else ``fn(completion time)`` between its steps."""
        if self.busy:
            self.calls.append(fn)
        else:
            fn(t)

    def run_calls(self, t: float) -> None:
        while self.calls:
            calls, self.calls = self.calls, []
            for fn in calls:
                fn(t)

    def load_report(self) -> LoadReport:
        """The engine's load now, as a live worker reports it."""
        return build_load_report(self.worker_id, self.engine)

    def check_drained(self) -> None:
        """Raise RuntimeError unless nothing is left on it: no request, no hold (pin or
        reservation), no block in use, and the scheduler's and cache's invariants hold."""
        problems = drain_problems(self.engine)
        if self.busy or self.calls:
            problems.insert(0, "a step or engine calls still running")
        if problems:
            raise RuntimeError(f"{self.worker_id} is not drained at the end of the replay: "
                               + "; ".join(problems))


def drain_problems(engine: LLMEngine) -> list[str]:
    """What is left on ``engine`` that a drained worker holds no more (empty: drained):
    unfinished requests, holds (pins or import reservations), blocks in use, broken
    invariants. On the engine's thread for a live worker."""
    kv = engine.kv
    problems = []
    if engine.has_unfinished():
        problems.append("unfinished requests")
    if len(kv.holds):
        problems.append(f"{len(kv.holds)} hold(s) of {kv.holds.num_blocks()} block(s) left "
                        "(pins or import reservations)")
    if kv.num_used_blocks:
        problems.append(f"{kv.num_used_blocks} block(s) still in use")
    try:
        engine.check_integrity()
        kv.check_integrity()
    except AssertionError as e:
        problems.append(f"integrity: {e}")
    return problems


def mocker_engine(config: ReplayConfig, clock: Clock) -> LLMEngine:
    """A worker's engine as ``config`` describes it: a mocker runner on ``clock`` (its
    sampling seed ``config.seed``), prefix caching on, the router's block size and hash seed."""
    engine_config = EngineConfig(
        block_size=config.block_size, num_blocks=config.num_blocks,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        enable_prefix_caching=True, hash_seed=config.hash_seed)
    runner = MockerRunner(config.vocab_size, config.num_blocks * config.block_size,
                          config.timing, clock, seed=config.seed)
    return LLMEngine(runner, engine_config)


def make_worker(config: ReplayConfig, index: int, worker_id: str) -> SimWorker:
    """A worker with the engine ``config`` describes, on a virtual clock of its own."""
    clock = VirtualClock()
    return SimWorker(index, worker_id, mocker_engine(config, clock), clock)


__all__ = ["EngineCall", "SimWorker", "drain_problems", "make_worker", "mocker_engine"]
