"""What a trace replay runs with: one frozen :class:`ReplayConfig`, validated when built.

The same config drives the offline replay (:mod:`orchestrator.replay.simulator`: every worker
an in-process mocker engine on one virtual clock) and the online one
(``orchestrator.replay.online``: the trace sent to a live deployment). The CLI
(``ferry replay``) reads its defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.replay.transfer import KvTransferModel
from router.cost import CostConfig
from router.disagg import DisaggConfig
from router.types import RouterMode
from workers.mocker.timing import TimingModel

TRANSFER_MODEL_OFFLINE_ONLY = (
    "--kv-bytes-per-token, --kv-transfer-gbps and --kv-transfer-latency-ms model the KV pull "
    "of the offline replay; the online replay pulls the mocker's KV between its workers over "
    "gRPC for real: leave them out, or add --offline")


def _int_at_least(name: str, value: object, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}; {hint}")


@dataclass(frozen=True)
class ReplayConfig:
    """
    - ``trace``: the Mooncake-format trace file (JSON lines).
    - ``workers``: aggregated workers (each prefills and decodes its own requests).
    - ``prefill_workers`` / ``decode_workers``: a disaggregated deployment (both or neither;
      then ``workers`` is not used): prefill workers only prefill and hand their KV over,
      decode workers decode and prefill short prompts themselves
      (offline: :mod:`orchestrator.replay.disagg`; online: :mod:`orchestrator.replay.online`).
    - ``disagg``: the router's local-or-remote prefill thresholds
      (:class:`~router.disagg.DisaggConfig`; None: its defaults). Disaggregated only.
    - ``transfer``: how long a KV pull takes (:class:`~orchestrator.replay.transfer.
      KvTransferModel`). Offline and disaggregated only (the online replay refuses another
      than the default: :data:`TRANSFER_MODEL_OFFLINE_ONLY`).
    - ``router``: routing mode (``kv``, ``approx``, ``round_robin``, ``random``).
    - ``speedup``: trace arrival times are divided by it (2.0 = twice the request rate).
    - ``block_size``, ``num_blocks`` (per worker), ``max_num_batched_tokens``,
      ``max_num_seqs``: each worker's engine (:class:`~workers.engine.config.EngineConfig`).
    - ``timing``: the mocker's timing model (forward-pass durations).
    - ``cost``: the router's cost function; None takes :class:`~router.cost.CostConfig`'s
      defaults.
    - ``limit``: replay only the first ``limit`` requests of the trace (None: all).
    - ``seed``: the router's tie-breaks and random picks, and the mockers' sampling seed.
    - ``hash_seed``: block-hash seed shared by the router and every worker.
    - ``vocab_size``: token ids of the replayed prompts and outputs lie in ``[0, vocab_size)``.
    """

    trace: Path
    workers: int = 8
    prefill_workers: int | None = None
    decode_workers: int | None = None
    router: RouterMode = RouterMode.KV
    speedup: float = 1.0
    block_size: int = 64
    num_blocks: int = 16384
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    timing: TimingModel = field(default_factory=TimingModel)
    cost: CostConfig | None = None
    disagg: DisaggConfig | None = None
    transfer: KvTransferModel = field(default_factory=KvTransferModel)
    limit: int | None = None
    seed: int = 0
    hash_seed: int = 0
    vocab_size: int = 32000

    def __post_init__(self) -> None:
        object.__setattr__(self, "trace", Path(self.trace))
        try:
            object.__setattr__(self, "router", RouterMode(self.router))
        except ValueError:
            raise ValueError(f"unknown router {self.router!r}; choose one of "
                             f"{', '.join(m.value for m in RouterMode)}") from None
        _int_at_least("workers", self.workers, 1, "give the number of workers, e.g. 8")
        if (self.prefill_workers is None) != (self.decode_workers is None):
            raise ValueError("give both --prefill-workers and --decode-workers for a "
                             "disaggregated replay, or neither")
        if self.prefill_workers is not None:
            _int_at_least("prefill_workers", self.prefill_workers, 1, "e.g. 2")
            _int_at_least("decode_workers", self.decode_workers, 1, "e.g. 6")
        s = self.speedup
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf:
            raise ValueError(f"speedup must be a number > 0 (arrival times are divided by it; "
                             f"1 replays the trace as recorded), got {s!r}")
        _int_at_least("block_size", self.block_size, 1, "e.g. 64")
        _int_at_least("num_blocks", self.num_blocks, 1, "KV blocks per worker, e.g. 16384")
        _int_at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1,
                      "the per-step token budget, e.g. 8192")
        _int_at_least("max_num_seqs", self.max_num_seqs, 1, "e.g. 256")
        if not isinstance(self.timing, TimingModel):
            raise TypeError(f"timing must be a TimingModel, got {type(self.timing).__name__}")
        if self.cost is not None and not isinstance(self.cost, CostConfig):
            raise TypeError(f"cost must be a CostConfig or None, got {type(self.cost).__name__}")
        if self.disagg is not None and not isinstance(self.disagg, DisaggConfig):
            raise TypeError(f"disagg must be a DisaggConfig or None, got "
                            f"{type(self.disagg).__name__}")
        if not isinstance(self.transfer, KvTransferModel):
            raise TypeError(f"transfer must be a KvTransferModel, got "
                            f"{type(self.transfer).__name__}")
        if self.limit is not None:
            _int_at_least("limit", self.limit, 1, "or leave it unset to replay the whole trace")
        for name in ("seed", "hash_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
                raise ValueError(f"{name} must be an integer in [0, 2**64), got {v!r}")
        _int_at_least("vocab_size", self.vocab_size, 2, "e.g. 32000")

    @property
    def disaggregated(self) -> bool:
        return self.prefill_workers is not None

    @property
    def cost_config(self) -> CostConfig:
        return self.cost if self.cost is not None else CostConfig()

    @property
    def disagg_config(self) -> DisaggConfig:
        return self.disagg if self.disagg is not None else DisaggConfig()

    @property
    def num_workers(self) -> int:
        """Workers the replay runs: prefill + decode when disaggregated, else ``workers``."""
        if self.prefill_workers is not None and self.decode_workers is not None:
            return self.prefill_workers + self.decode_workers
        return self.workers


__all__ = ["TRANSFER_MODEL_OFFLINE_ONLY", "ReplayConfig"]
