"""How a frontend's :class:`~orchestrator.routing.service.RoutingService` routes: one frozen
:class:`RoutingConfig`, validated when built (errors say what to change)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from kvcache.hashing import BlockHashConfig
from router.cost import CostConfig
from router.disagg import DisaggConfig
from router.types import RouterMode

_REPLICA_ID = re.compile(r"[A-Za-z0-9_-]+")


def _seconds(name: str, value: object, hint: str, *, zero_ok: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}; "
                         f"{hint}")


@dataclass(frozen=True)
class RoutingConfig:
    """
    - ``mode``: ``kv`` (overlap from the workers' KV events; the default), ``approx`` (overlap
      predicted from this replica's own decisions; load reports only), ``round_robin`` and
      ``random`` (no events at all: no NATS connection).
    - ``hash_config``: block size and hash seed; every worker must use the same (checked when
      a worker registers).
    - ``cost``: the router's cost function (:class:`router.cost.CostConfig`).
    - ``seed``: the router's tie-breaks and random picks.
    - ``load_grace_s``: how long a routed request may take to show up in its worker's load
      report (see :mod:`router.load`); in-flight entries younger than this are not dropped by
      a report.
    - ``approx_ttl_s``: ``approx`` mode: how long a prediction lasts.
    - ``share_inflight``: publish this replica's routing decisions and completions on
      ``ferry.router.inflight`` and count the other replicas' ones as in-flight load (see
      :mod:`orchestrator.routing.inflight`). Only for the modes that read load (kv, approx).
    - ``replica_id``: names this replica in those messages; None picks a random one.
    - ``repair_timeout_s``: deadline of one JetStream replay when repairing a gap.
    - ``track_achievable``: keep the set of every block hash routed for the achievable hit
      rate of :meth:`router.Router.stats` (memory grows with the distinct blocks seen).
    - ``disagg``: when prefill and decode workers are registered, when a prompt is prefilled
      on the decode worker instead of a prefill worker (:class:`router.disagg.DisaggConfig`).
    """

    mode: RouterMode = RouterMode.KV
    hash_config: BlockHashConfig = field(default_factory=BlockHashConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    seed: int = 0
    load_grace_s: float = 0.5
    approx_ttl_s: float = 120.0
    share_inflight: bool = True
    replica_id: str | None = None
    repair_timeout_s: float = 5.0
    track_achievable: bool = True
    disagg: DisaggConfig = field(default_factory=DisaggConfig)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", RouterMode(self.mode))
        except ValueError:
            raise ValueError(f"unknown router mode {self.mode!r}; choose one of "
                             f"{', '.join(m.value for m in RouterMode)}") from None
        if not isinstance(self.hash_config, BlockHashConfig):
            raise TypeError(f"hash_config must be a BlockHashConfig, got "
                            f"{type(self.hash_config).__name__}")
        if not isinstance(self.cost, CostConfig):
            raise TypeError(f"cost must be a CostConfig, got {type(self.cost).__name__}")
        if not isinstance(self.disagg, DisaggConfig):
            raise TypeError(f"disagg must be a DisaggConfig, got {type(self.disagg).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")  # noqa: TRY004
        _seconds("load_grace_s", self.load_grace_s, "e.g. 0.5", zero_ok=True)
        _seconds("approx_ttl_s", self.approx_ttl_s, "e.g. 120")
        _seconds("repair_timeout_s", self.repair_timeout_s, "e.g. 5")
        if not isinstance(self.share_inflight, bool):
            raise TypeError(f"share_inflight must be True or False, got {self.share_inflight!r}")
        if not isinstance(self.track_achievable, bool):
            raise TypeError(f"track_achievable must be True or False, got "
                            f"{self.track_achievable!r}")
        if self.replica_id is not None and (not isinstance(self.replica_id, str)
                                            or not _REPLICA_ID.fullmatch(self.replica_id)):
            raise ValueError(f"replica_id must be letters, digits, '-' and '_' only, or None "
                             f"for a random one; got {self.replica_id!r}")

    @property
    def needs_kv_events(self) -> bool:
        """Only ``kv`` reads the workers' KV events (``approx`` predicts its own)."""
        return self.mode is RouterMode.KV

    @property
    def needs_load(self) -> bool:
        """The modes whose cost function reads load (reports and in-flight entries)."""
        return self.mode in (RouterMode.KV, RouterMode.APPROX)

    @property
    def needs_nats(self) -> bool:
        return self.needs_load


__all__ = ["RoutingConfig"]
