"""Trace replay: a Mooncake trace through the router and workers (``ferry replay``).

- :mod:`orchestrator.replay.config`: :class:`ReplayConfig`, what a replay runs with;
- :mod:`orchestrator.replay.trace_file`: reading the trace;
- :mod:`orchestrator.replay.simulator`: the offline replay (mocker engines, virtual clock);
- :mod:`orchestrator.replay.disagg`: the offline replay of prefill and decode workers, with
  :mod:`orchestrator.replay.transfer` (how long a KV pull takes);
- :mod:`orchestrator.replay.sim_loop`: the offline replays' event loop (virtual clock), and
  :mod:`orchestrator.replay.sim_workers`: their mocker workers;
- :mod:`orchestrator.replay.oracle`: the reuse an infinite shared cache would give;
- :mod:`orchestrator.replay.report`: :class:`ReplayReport`, as a table or JSON;
- :mod:`orchestrator.replay.online`: the online replay (a live local cluster of mocker
  workers over gRPC and NATS, on the wall clock, aggregated or disaggregated), with
  :mod:`orchestrator.replay.live_cluster` (that cluster, and what it counts).

Nothing is imported here, so that ``ferry`` starts fast: import the submodules.
"""
