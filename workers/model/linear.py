"""Linear layers with weights prepacked for oneDNN on CPU.

With a few tokens per pass (decode), MKL's plain sgemm reaches about half the CPU's fp32 peak
on LLM shapes; oneDNN with a prepacked weight (the same kernels ``torch.compile`` uses for
frozen CPU models) does well above plain sgemm at 2 to 128 tokens; from about 256 tokens on
(prefill) plain sgemm is as fast or a little faster, so :func:`linear` switches by token count.

One token (decode at batch 1) goes to MKL's gemv, which runs on the calling thread: the pass
is bound by reading the weights, and oneDNN's kernel forks the OpenMP team for every call. On
a CPU shared with other processes a fork waits for a core to come free -- measured on a busy
2-core machine, a packed batch-1 call took 10-50x as long as the gemv (and a whole batch-1
step 4.5x), while on an idle one the two are close.

Packing is an optimisation only: where it is not available (not CPU, not float32, a torch
without oneDNN) :func:`linear` falls back to ``F.linear`` and gives the same result up to float
rounding.

The packed copy is opaque and separate from the parameter: whoever changes a weight must
:func:`pack` again (the model drops its packs in ``load_weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weight_parameter(out_features: int, in_features: int) -> nn.Parameter:
    """An uninitialised ``[out, in]`` weight stored input-major (the transpose is contiguous):
    MKL's single-token product streams that layout about 25 % faster (measured on a 2-core
    AVX2 CPU: 16 against 12.8 GB/s), and every other path runs at the same speed on it."""
    return nn.Parameter(torch.empty(in_features, out_features).t(), requires_grad=False)


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


PACKED_MIN_TOKENS = 2  # one token: MKL's gemv on the calling thread (see above)
PACKED_MAX_TOKENS = 256  # from here on MKL's plain sgemm is as fast or faster
SWIGLU_PACKED_MAX_TOKENS = 256  # fused element-wise ops in oneDNN lose to MKL from here on


def use_packed(
    x: torch.Tensor, packed: torch.Tensor | None, max_tokens: int = PACKED_MAX_TOKENS
) -> bool:
    """Whether ``x`` goes through the packed weight (see the module doc)."""
    return (
        packed is not None
        and PACKED_MIN_TOKENS <= x.shape[0] < max_tokens
        and x.device.type == "cpu"
        and x.dtype == torch.float32
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T (+ bias)``; 2 to 255 tokens on CPU go through the packed weight if there
    is one."""
    if use_packed(x, packed):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor | None,
    residual: torch.Tensor,
) -> torch.Tensor:
    """``residual + x @ weight.T``; on the packed path the add runs inside the matmul."""
    if use_packed(x, packed):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, None, "add")
    return F.linear(x, weight).add_(residual)


def silu_mul(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    gate_packed: torch.Tensor | None,
    up_packed: torch.Tensor | None,
) -> torch.Tensor:
    """SwiGLU's ``silu(x @ gate.T) * (x @ up.T)`` for ``gate_up = cat(gate, up)``. On the packed
    path both element-wise ops run inside the two matmuls (one OpenMP fork each, instead of one
    for the fused matmul and one for each element-wise op from about 32 tokens up); otherwise
    two matmuls, so that the element-wise ops run over contiguous rows."""
    if use_packed(x, gate_packed, SWIGLU_PACKED_MAX_TOKENS) and up_packed is not None:
        gate = torch.ops.mkldnn._linear_pointwise(x, gate_packed, None, "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, up_packed, None, "mul")
    inter = gate_up.shape[0] // 2
    gate = F.silu(F.linear(x, gate_up[:inter]), inplace=True)
    return gate.mul_(F.linear(x, gate_up[inter:]))
