"""The shape of a Llama-family decoder (Llama, SmolLM, Qwen2-style), validated when built.

Built from a Hugging Face ``config.json`` dict (:meth:`ModelConfig.from_hf_config`, old
``rope_theta``/``rope_scaling`` keys and the newer ``rope_parameters`` alike) or from GGUF
metadata (:meth:`ModelConfig.from_gguf_metadata`, the ``{arch}.*`` keys llama.cpp writes).
RoPE scaling: none, or ``llama3`` (Llama 3.1's smoothed frequency interpolation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_HF_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ModelConfigError(ValueError):
    """A model configuration Ferry cannot run; the message says which field to change."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not self.factor > 0 or not self.low_freq_factor > 0:
            raise ModelConfigError("llama3 rope scaling needs factor > 0 and low_freq_factor > 0")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ModelConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        if self.original_max_position_embeddings <= 0:
            raise ModelConfigError("llama3 rope scaling needs original_max_position_embeddings > 0")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    # Per-frequency divisors from a GGUF ``rope_freqs.weight`` (llama.cpp's form of llama3 scaling)
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ModelConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not (
            isinstance(self.rope_theta, (int, float))
            and math.isfinite(self.rope_theta)
            and self.rope_theta > 1
        ):
            raise ModelConfigError(
                f"rope_theta must be a finite number > 1, got {self.rope_theta!r}"
            )
        for token_id in (
            *self.eos_token_ids,
            *(() if self.bos_token_id is None else (self.bos_token_id,)),
        ):
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id:
                raise ModelConfigError(f"special token ids must be integers >= 0, got {token_id!r}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ModelConfigError(
                f"rope_freq_factors needs head_dim/2 = {self.head_dim // 2} entries, "
                f"got {len(self.rope_freq_factors)}"
            )
        if self.rope_freq_factors is not None and self.rope_scaling is not None:
            raise ModelConfigError("give rope_scaling or rope_freq_factors, not both")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_hf_config(
        cls, cfg: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
    ) -> ModelConfig:
        """From a parsed ``config.json`` (and optionally ``generation_config.json``)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ModelConfigError(
                f"config.json has model_type {model_type!r}; "
                f"Ferry runs {list(SUPPORTED_HF_MODEL_TYPES)} "
                "(Llama-family decoders)"
            )
        try:
            hidden = _int(cfg, "hidden_size")
            heads = _int(cfg, "num_attention_heads")
            layers = _int(cfg, "num_hidden_layers")
            intermediate = _int(cfg, "intermediate_size")
            vocab = _int(cfg, "vocab_size")
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks required key {e.args[0]!r}") from None
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or (hidden // heads)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act must be 'silu', got {cfg.get('hidden_act')!r}")
        if cfg.get("mlp_bias"):
            raise ModelConfigError("mlp_bias=true is not supported")
        rope_theta, scaling = _hf_rope(cfg)
        eos = _id_tuple(cfg.get("eos_token_id"))
        if generation_config:
            eos = _merge_ids(eos, _id_tuple(generation_config.get("eos_token_id")))
        bos = cfg.get("bos_token_id")
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=bos,
            eos_token_ids=eos,
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        )

    @classmethod
    def from_gguf_metadata(
        cls,
        meta: Mapping[str, Any],
        *,
        vocab_size: int | None = None,
        tie_word_embeddings: bool = False,
        rope_freq_factors: tuple[float, ...] | None = None,
    ) -> ModelConfig:
        """From GGUF metadata; ``vocab_size`` defaults to the tokenizer's token count."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise ModelConfigError(
                f"GGUF general.architecture is {arch!r}; Ferry runs {list(SUPPORTED_GGUF_ARCHS)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelConfigError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv_heads = int(get("attention.head_count_kv", heads))
        head_dim = int(
            meta.get(f"{arch}.attention.key_length")
            or meta.get(f"{arch}.rope.dimension_count")
            or hidden // heads
        )
        if vocab_size is None:
            vocab_size = meta.get(f"{arch}.vocab_size")
            if vocab_size is None:
                tokens = meta.get("tokenizer.ggml.tokens")
                if tokens is None:
                    raise ModelConfigError(
                        f"GGUF metadata gives no vocab size ({arch}.vocab_size or tokens)"
                    )
                vocab_size = len(tokens)
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
            raise ModelConfigError(
                f"GGUF rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported "
                "(only none, "
                "or llama3 given as rope_freqs.weight)"
            )
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(
            vocab_size=int(vocab_size),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_merge_ids(_id_tuple(eos), _id_tuple(eot)),
            attention_bias=arch == "qwen2",
            rope_freq_factors=rope_freq_factors,
        )


def _int(cfg: Mapping[str, Any], key: str) -> int:
    return int(cfg[key])


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _merge_ids(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return a + tuple(x for x in b if x not in a)


def _hf_rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from ``rope_scaling`` (older) or ``rope_parameters`` (newer)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ModelConfigError(f"rope_scaling/rope_parameters must be an object, got {params!r}")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return float(theta), None
    if rope_type != "llama3":
        raise ModelConfigError(
            f"rope type {rope_type!r} is not supported; Ferry supports no scaling or 'llama3'"
        )
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise ModelConfigError(f"llama3 rope scaling lacks {missing}")
    return float(theta), RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
