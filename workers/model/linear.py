"""Linear layers with weights prepacked for oneDNN on CPU.

With few tokens per pass (decode), MKL's plain sgemm reaches about half the CPU's fp32 peak on
LLM shapes; oneDNN with a prepacked weight (the same kernels ``torch.compile`` uses for frozen
CPU models) gets close to the memory-bandwidth limit at batch 1 and well above plain sgemm at
batch 8 to 128; from about 256 tokens on (prefill) plain sgemm is as fast or a little faster,
so :func:`linear` switches by token count. Packing is an optimisation only: where it is
not available (not CPU, not float32, a torch without oneDNN) :func:`linear` falls back to
``F.linear`` and gives the same result up to float rounding.

The packed copy is opaque and separate from the parameter: whoever changes a weight must
:func:`pack` again (the model drops its packs in ``load_weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-packed copy of ``weight [out, in]``, or None where packing is unavailable."""
    if not can_pack(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (RuntimeError, AttributeError):
        return None


PACKED_MAX_TOKENS = 256  # from here on MKL's plain sgemm is as fast or faster


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T (+ bias)``; few tokens on CPU go through the packed weight if there is one."""
    if (
        packed is not None
        and x.shape[0] < PACKED_MAX_TOKENS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
    ):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
