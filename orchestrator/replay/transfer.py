"""How long the offline disaggregated replay says a KV pull takes (no bytes move).

``seconds(tokens) = latency_ms / 1000 + tokens * bytes_per_token / (bandwidth_gb_s * 1e9)``

for the ``tokens`` whose KV the decode worker pulls: the handle's full prompt blocks minus the
leading ones it already caches (``workers.engine.kv_import.plan_import`` skips those, as the
live decode worker does), times the block size.

Defaults:

- ``bytes_per_token = 131072``: K and V (2) x 32 layers x 8 KV heads x 128 head dim x 2 bytes
  (bf16), the KV of one token of a Llama-3-8B-shaped model. The mocker has no model, so the
  shape is a number here; give your model's (``2 * layers * kv_heads * head_dim * dtype
  bytes``) with ``--kv-bytes-per-token``.
- ``bandwidth_gb_s = 64.0`` (GB/s, 1e9 bytes): the default of NVIDIA Dynamo's mocker
  (``--kv-transfer-bandwidth``, ai-dynamo/dynamo pull request 6504): about one PCIe 5 x16
  link; one 400 Gb/s RDMA NIC gives 50, NVLink within a node several hundred.
- ``latency_ms = 0.0``: a fixed cost per pull (handshake, the release round trip); 0, as in
  Dynamo's mocker.

Pulls are independent: each takes its own time whatever else moves (no shared link, no queue;
Dynamo's mocker does the same by default). A pull does not slow either worker's steps: the
live transfer runs beside the engines (``kvcache.transfer``), and only its start (the
reservation) and end (the commit, the release) wait for a step boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KvTransferModel:
    bytes_per_token: int = 131072
    bandwidth_gb_s: float = 64.0
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        b = self.bytes_per_token
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"kv bytes per token must be an integer >= 1 (2 * layers * "
                             f"kv_heads * head_dim * dtype bytes, e.g. 131072), got {b!r}")
        g = self.bandwidth_gb_s
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < math.inf:
            raise ValueError(f"kv transfer bandwidth must be a number of GB/s > 0 (e.g. 64), "
                             f"got {g!r}")
        lat = self.latency_ms
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) \
                or not 0 <= lat < math.inf:
            raise ValueError(f"kv transfer latency must be a number of ms >= 0, got {lat!r}")

    def bytes_of(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def seconds(self, num_tokens: int) -> float:
        """Time to pull the KV of ``num_tokens`` tokens (see the module docstring)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return self.latency_ms / 1000.0 + self.bytes_of(num_tokens) / (self.bandwidth_gb_s * 1e9)


__all__ = ["KvTransferModel"]
