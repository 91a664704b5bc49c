"""The router's numbers on the frontend's ``/metrics``: a Prometheus collector registered in the
frontend's own registry (:meth:`RoutingService.attach`), read at scrape time from
:meth:`RoutingService.stats` (so it costs nothing per request).

- ``ferry_router_prefix_hit_rate``: prompt blocks the chosen worker held (as the router knew
  it: from KV events in ``kv`` mode, predicted in ``approx``) / full prompt blocks routed;
- ``ferry_router_achievable_prefix_hit_rate``: the same with an infinite cache shared by all
  workers (the blocks any earlier request had routed), the ceiling for the one above;
- ``ferry_router_requests_total``, ``ferry_router_workers``, and the event feed's health:
  ``ferry_router_kv_batches_applied_total``, ``ferry_router_kv_gaps_total``,
  ``ferry_router_kv_resyncs_total``, ``ferry_router_peer_inflight_updates_total``,
  ``ferry_router_fallback_picks_total``.

The frontend's own ``ferry_frontend_prefix_cache_hit_rate`` is what the workers reported
(cached / prompt tokens); the router's rates are what routing aimed for.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class RoutingCollector(Collector):
    def __init__(self, service) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        s = self._service.stats()
        r = s.router
        mode = self._service.config.mode.value
        hit = GaugeMetricFamily("ferry_router_prefix_hit_rate",
                                "Prompt blocks held by the chosen worker (as the router knew "
                                "it) / full prompt blocks routed", labels=["mode"])
        hit.add_metric([mode], r.hit_rate)
        yield hit
        ach = GaugeMetricFamily("ferry_router_achievable_prefix_hit_rate",
                                "Prompt blocks an infinite cache shared by all workers would "
                                "hold / full prompt blocks routed", labels=["mode"])
        ach.add_metric([mode], r.achievable_hit_rate)
        yield ach
        yield GaugeMetricFamily("ferry_router_workers", "Workers registered with the router",
                                value=s.workers)
        for name, doc, value in (
            ("ferry_router_requests", "Requests routed", r.requests),
            ("ferry_router_kv_batches_applied", "KV event batches applied to the index",
             s.kv_batches_applied),
            ("ferry_router_kv_gaps", "Gaps in a worker's KV events (repaired by replay)",
             s.gaps),
            ("ferry_router_kv_resyncs", ("Workers cleared in the index because missing KV "
             "events were no longer in the stream"), s.resyncs),
            ("ferry_router_peer_inflight_updates", ("In-flight updates applied from other "
             "router replicas"), s.peer_updates),
            ("ferry_router_fallback_picks", ("Requests sent to a worker other than the "
             "router's choice (it was not a candidate)"), s.fallbacks),
        ):
            yield CounterMetricFamily(name, doc, value=value)


__all__ = ["RoutingCollector"]
