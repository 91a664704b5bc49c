"""Each worker's load as the router sees it: its latest report plus the router's own in-flight
accounting, so that requests routed in the same instant do not all land on one worker.

Reports (worker side): a worker publishes a :class:`~router.types.LoadReport` periodically and
when its load changes. Its ``timestamp`` (the worker's clock) only orders that worker's
reports: one older than the latest seen is ignored.

In-flight accounting (router side): when the router sends a request to a worker it records an
entry (:meth:`LoadView.on_routed`): the prompt blocks the worker must compute
(``prefill_blocks``) and the blocks the request will hold (``decode_blocks``). The entry adds
both to the worker's load until the caller says the prefill is done
(:meth:`~LoadView.on_prefill_done`: the prefill part stops counting) or the request finished
(:meth:`~LoadView.on_finished`: the entry is gone), or until a report covers it.

The covering rule: the router stamps each report with *its own* clock when the report is
applied (worker and router clocks need not agree). A report applied at router time ``q``
covers every in-flight entry of that worker routed at time ``r`` with ``r + grace_s <= q``:
the request reached the worker and the report counts it (its prompt in
``active_prefill_tokens``, its blocks in ``kv_blocks_used`` / ``active_decode_blocks``), so
the entry stops counting and is dropped. ``grace_s`` is how long a request may take to show up
in a report (network plus the report period's lag); a larger value counts a request twice for
a while, which errs on the side of spreading load.

What the cost function gets (:class:`~router.types.WorkerLoad`), per worker (the report's
terms are 0 before its first report):

    queued_prefill_blocks = ceil(report.active_prefill_tokens / block_size)
                            + prefill_blocks of the uncovered entries not prefilled yet
    decode_blocks         = report.active_decode_blocks + decode_blocks of uncovered entries
    kv_blocks_used        = report.kv_blocks_used + decode_blocks of uncovered entries
    kv_blocks_total       = report.kv_blocks_total, or the registered capacity (no report / 0)
    waiting               = report.waiting + uncovered entries not prefilled yet
    running               = report.running

No I/O, no threads: the clock is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from router.types import LoadReport, WorkerLoad


class _Entry:
    __slots__ = ("decode_blocks", "gone", "prefill_blocks", "prefill_done", "routed_at",
                 "worker")

    def __init__(self, worker: _Worker, routed_at: float, prefill_blocks: int,
                 decode_blocks: int) -> None:
        self.worker = worker
        self.routed_at = routed_at
        self.prefill_blocks = prefill_blocks
        self.decode_blocks = decode_blocks
        self.prefill_done = False
        self.gone = False  # finished or covered: no longer counts


class _Worker:
    __slots__ = ("capacity", "decode", "entries", "prefill", "report", "view", "waiting",
                 "worker_id")

    def __init__(self, worker_id: str, capacity: int) -> None:
        self.worker_id = worker_id
        self.capacity = capacity
        self.report: LoadReport | None = None
        self.entries: deque[tuple[str, _Entry]] = deque()  # routing order
        self.prefill = 0  # sums over the entries that count
        self.decode = 0
        self.waiting = 0
        self.view: WorkerLoad | None = None  # cached, rebuilt after a change


class LoadView:
    """Per-worker load from reports and in-flight accounting (see the module docstring)."""

    def __init__(self, block_size: int, clock: Callable[[], float], grace_s: float = 0.0) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s!r}")
        self.block_size = block_size
        self.grace_s = float(grace_s)
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._requests: dict[str, _Entry] = {}

    # ---------------------------------------------------------------- workers

    def add_worker(self, worker_id: str, capacity_blocks: int) -> None:
        if worker_id in self._workers:
            raise ValueError(f"worker {worker_id!r} already has a load entry; remove it first")
        self._workers[worker_id] = _Worker(worker_id, capacity_blocks)

    def remove_worker(self, worker_id: str) -> bool:
        """Forget the worker and its in-flight requests; False if unknown."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return False
        for rid, entry in w.entries:
            if not entry.gone:
                entry.gone = True
                del self._requests[rid]
        return True

    # ---------------------------------------------------------------- reports

    def apply_report(self, report: LoadReport) -> bool:
        """Take a report; False (nothing changed) for an unknown worker or an older report."""
        w = self._workers.get(report.worker_id)
        if w is None or (w.report is not None and report.timestamp < w.report.timestamp):
            return False
        w.report = report
        horizon = self._clock() - self.grace_s
        entries = w.entries
        while entries and (entries[0][1].gone or entries[0][1].routed_at <= horizon):
            rid, entry = entries.popleft()
            if not entry.gone:
                self._uncount(w, entry)
                del self._requests[rid]
        w.view = None
        return True

    # ---------------------------------------------------------------- in flight

    def on_routed(self, worker_id: str, request_id: str, prefill_blocks: int,
                  decode_blocks: int) -> None:
        """Count a request just sent to ``worker_id`` until done, finished or covered."""
        w = self._workers.get(worker_id)
        if w is None:
            raise KeyError(f"worker {worker_id!r} has no load entry; add_worker first")
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in flight; request ids must "
                             "be unique among unfinished requests")
        for name, v in (("prefill_blocks", prefill_blocks), ("decode_blocks", decode_blocks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        entry = _Entry(w, self._clock(), prefill_blocks, decode_blocks)
        self._requests[request_id] = entry
        w.entries.append((request_id, entry))
        w.prefill += prefill_blocks
        w.decode += decode_blocks
        w.waiting += 1
        w.view = None

    def on_prefill_done(self, request_id: str) -> bool:
        """The request's prompt is computed; False if it no longer counts (or never did)."""
        entry = self._requests.get(request_id)
        if entry is None or entry.prefill_done:
            return False
        entry.prefill_done = True
        w = entry.worker
        w.prefill -= entry.prefill_blocks
        w.waiting -= 1
        w.view = None
        return True

    def on_finished(self, request_id: str) -> bool:
        """The request is done (or aborted); False if it no longer counted (or never did)."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        w = entry.worker
        self._uncount(w, entry)
        entries = w.entries
        while entries and entries[0][1].gone:  # keep the queue short without reports
            entries.popleft()
        return True

    def is_in_flight(self, request_id: str) -> bool:
        return request_id in self._requests

    # ---------------------------------------------------------------- views

    def load(self, worker_id: str) -> WorkerLoad:
        w = self._workers.get(worker_id)
        if w is None:
            raise KeyError(f"worker {worker_id!r} has no load entry; add_worker first")
        return w.view or self._build(w)

    def loads(self) -> list[WorkerLoad]:
        """Every worker's load, in the order they were added."""
        return [w.view or self._build(w) for w in self._workers.values()]

    def _build(self, w: _Worker) -> WorkerLoad:
        r = w.report
        bs = self.block_size
        if r is None:
            view = WorkerLoad(w.worker_id, w.prefill, w.decode, w.decode, w.capacity,
                              w.waiting, 0)
        else:
            view = WorkerLoad(
                w.worker_id,
                queued_prefill_blocks=-(-r.active_prefill_tokens // bs) + w.prefill,
                decode_blocks=r.active_decode_blocks + w.decode,
                kv_blocks_used=r.kv_blocks_used + w.decode,
                kv_blocks_total=r.kv_blocks_total or w.capacity,
                waiting=r.waiting + w.waiting,
                running=r.running,
            )
        w.view = view
        return view

    @staticmethod
    def _uncount(w: _Worker, entry: _Entry) -> None:
        entry.gone = True
        if not entry.prefill_done:
            w.prefill -= entry.prefill_blocks
            w.waiting -= 1
        w.decode -= entry.decode_blocks
        w.view = None
