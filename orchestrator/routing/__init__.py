"""Live KV-aware routing inside a frontend process: the pure :mod:`router` fed from NATS.

- :class:`RoutingService` (service.py): the router, its feeds and the frontend wiring (worker
  registration with the block-size / seed check, picking, first-token and finished hooks);
- :class:`KvFeed` (kv_feed.py): KV events from JetStream into the prefix index, with gap repair;
- :class:`PeerLink` (inflight.py): in-flight load shared between router replicas on
  ``ferry.router.inflight``;
- :class:`RoutingCollector` (metrics.py): the router's hit rates on ``/metrics``.
"""

from orchestrator.routing.config import RoutingConfig
from orchestrator.routing.inflight import (
    INFLIGHT_SUBJECT,
    InflightKind,
    InflightUpdate,
    PeerLink,
    apply_update,
    decode_update,
    encode_update,
)
from orchestrator.routing.kv_feed import KvFeed
from orchestrator.routing.metrics import RoutingCollector
from orchestrator.routing.service import RoutingService, RoutingStats, worker_info

__all__ = [
    "INFLIGHT_SUBJECT",
    "InflightKind",
    "InflightUpdate",
    "KvFeed",
    "PeerLink",
    "RoutingCollector",
    "RoutingConfig",
    "RoutingService",
    "RoutingStats",
    "apply_update",
    "decode_update",
    "encode_update",
    "worker_info",
]
