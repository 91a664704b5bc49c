"""GGML tensor types and vectorized numpy dequantizers (ggml's block layouts).

Block formats (little-endian; ``d``/``m`` are float16 scales, quants follow):

* ``Q8_0``: 32 values = ``d`` + 32 int8 ``q``; ``x = d * q``.
* ``Q4_0``: 32 values = ``d`` + 16 bytes; the low nibbles are values 0..15, the high nibbles
  values 16..31; ``x = d * (q - 8)``.
* ``Q4_1``: 32 values = ``d`` + ``m`` + 16 bytes (nibbles as Q4_0); ``x = d * q + m``.
* ``Q5_0`` / ``Q5_1``: as Q4_0 / Q4_1 with a fifth bit per value in a 32-bit ``qh`` (bit j
  for value j); Q5_0 subtracts 16, Q5_1 adds ``m``.
* ``Q4_K`` / ``Q5_K`` (256 values): ``d``, ``dmin``, 12 bytes of 6-bit scales and mins for 8
  sub-blocks of 32, then the nibbles (Q5_K: plus ``qh``, one bit plane per sub-block);
  ``x = d * scale * q - dmin * min``.
* ``Q6_K`` (256 values): 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per
  16 values), ``d``; ``x = d * scale * (q - 32)``.
* ``F32``, ``F16``, ``BF16`` (the top 16 bits of a float32): plain arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# ggml_type id -> name (ggml.h), so an unsupported type can name itself
GGML_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30


class UnsupportedQuantError(ValueError):
    """A tensor type Ferry cannot dequantize."""


def _f16(col: np.ndarray) -> np.ndarray:
    """``[n, 2]`` uint8 -> ``[n, 1]`` float32 from little-endian float16 bytes."""
    return np.ascontiguousarray(col).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, 16]`` packed bytes -> ``[n, 32]`` uint8: low nibbles then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _deq_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float32)


def _deq_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _deq_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _deq_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 34)
    return _f16(blocks[:, :2]) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _deq_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 18)
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return _f16(blocks[:, :2]) * q.astype(np.float32)


def _deq_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 20)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return _f16(blocks[:, :2]) * q + _f16(blocks[:, 2:4])


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """``[n, 4]`` bytes of a little-endian uint32 -> ``[n, 32]`` bits (bit j = value j)."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def _deq_q5_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 22)
    q = _nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)
    return _f16(blocks[:, :2]) * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


def _deq_q5_1(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 24)
    q = (_nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)).astype(np.float32)
    return _f16(blocks[:, :2]) * q + _f16(blocks[:, 2:4])


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4)."""
    low, high, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 63, (mixed & 15) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([high & 63, (mixed >> 4) | ((high >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, 128]`` -> ``[n, 8, 32]``: each 32-byte run gives two sub-blocks (low, then high)."""
    runs = qs.reshape(qs.shape[0], 4, 1, 32)
    return np.concatenate([runs & 15, runs >> 4], axis=2).reshape(qs.shape[0], 8, 32)


def _deq_q4_k(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 144)
    scales, mins = _k_scales(blocks[:, 4:16])
    d = (_f16(blocks[:, 0:2]) * scales)[:, :, None]
    dm = (_f16(blocks[:, 2:4]) * mins)[:, :, None]
    return d * _k_nibbles(blocks[:, 16:]).astype(np.float32) - dm


def _deq_q5_k(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 176)
    scales, mins = _k_scales(blocks[:, 4:16])
    d = (_f16(blocks[:, 0:2]) * scales)[:, :, None]
    dm = (_f16(blocks[:, 2:4]) * mins)[:, :, None]
    # bit i of qh[l] is the fifth bit of value l in sub-block i
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = _k_nibbles(blocks[:, 48:]) | (high << 4)
    return d * q.astype(np.float32) - dm


def _deq_q6_k(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 210)
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    low = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = (_f16(blocks[:, 208:210]) * scales)[:, :, None]
    return d * q.astype(np.float32)


# ggml_type -> (values per block, bytes per block, dequantizer)
_FORMATS: dict[int, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    F32: (1, 4, _deq_f32),
    F16: (1, 2, _deq_f16),
    BF16: (1, 2, _deq_bf16),
    Q8_0: (32, 34, _deq_q8_0),
    Q4_0: (32, 18, _deq_q4_0),
    Q4_1: (32, 20, _deq_q4_1),
    Q5_0: (32, 22, _deq_q5_0),
    Q5_1: (32, 24, _deq_q5_1),
    Q4_K: (256, 144, _deq_q4_k),
    Q5_K: (256, 176, _deq_q5_k),
    Q6_K: (256, 210, _deq_q6_k),
}
SUPPORTED_TYPES = tuple(GGML_TYPE_NAMES[t] for t in _FORMATS)


def type_name(ggml_type: int) -> str:
    return GGML_TYPE_NAMES.get(ggml_type, f"unknown type {ggml_type}")


def tensor_nbytes(ggml_type: int, num_values: int, name: str = "tensor") -> int:
    block_values, block_bytes, _ = _format(ggml_type, name)
    if num_values % block_values:
        raise UnsupportedQuantError(
            f"{name}: {num_values} values is not a whole number of {type_name(ggml_type)} blocks"
        )
    return num_values // block_values * block_bytes


def dequantize(
    raw: np.ndarray, ggml_type: int, num_values: int, name: str = "tensor"
) -> np.ndarray:
    """Raw bytes (uint8) of a tensor -> flat float32 ``[num_values]``."""
    nbytes = tensor_nbytes(ggml_type, num_values, name)
    if raw.size != nbytes:
        raise UnsupportedQuantError(
            f"{name}: {raw.size} bytes, a {type_name(ggml_type)} tensor of "
            f"{num_values} values needs {nbytes}"
        )
    out = _FORMATS[ggml_type][2](raw.reshape(-1))
    return out.reshape(-1)


def _format(ggml_type: int, name: str) -> tuple[int, int, Callable[[np.ndarray], np.ndarray]]:
    fmt = _FORMATS.get(ggml_type)
    if fmt is None:
        raise UnsupportedQuantError(
            f"{name} is stored as {type_name(ggml_type)}, which Ferry cannot dequantize; "
            f"use a GGUF file in one of {list(SUPPORTED_TYPES)}"
        )
    return fmt
