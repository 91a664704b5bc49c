"""Llama-family decoder (Llama, SmolLM, Qwen2-style) in plain torch, reading a paged KV cache.

Numerically it is Hugging Face's ``LlamaForCausalLM``: RMSNorm in float32, RoPE in the
``rotate_half`` convention, grouped-query attention, SwiGLU MLP, tied or untied embeddings. The
weights are stored fused for speed: ``qkv_proj = cat(q, k, v)`` and ``gate_up_proj =
cat(gate, up)``; :meth:`LlamaForCausalLM.load_weights` takes Hugging Face tensor names and
fuses them, so every loader (safetensors, GGUF) feeds the same method.

One forward pass runs a flattened batch of new tokens at given positions: each layer writes
the new K/V into their cache slots and attends over each sequence's blocks
(``paged_attention.py``); the final hidden states come back, and :meth:`compute_logits` turns
the rows that need sampling into logits. Linear weights are prepacked for oneDNN on CPU on the
first forward (``linear.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.attention_metadata import AttentionMetadata
from workers.model.config import ModelConfig
from workers.model.linear import linear, linear_add, pack, silu_mul, weight_parameter
from workers.model.paged_attention import AttentionPlan, build_plan, paged_attention, write_kv
from workers.model.rope import apply_rope, rope_tables

_ROPE_TABLE_LIMIT = 1 << 17  # positions precomputed at most (longer contexts extend on demand)


class WeightLoadError(ValueError):
    """Checkpoint tensors that do not fit the configured model (name, shape, or missing)."""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # fused kernel, same result as the float32 formula below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.qkv_proj = weight_parameter(c.q_size + 2 * c.kv_size, c.hidden_size)
        self.qkv_bias = (
            nn.Parameter(torch.zeros(c.q_size + 2 * c.kv_size), requires_grad=False)
            if c.attention_bias
            else None
        )
        self.o_proj = weight_parameter(c.hidden_size, c.q_size)
        self.gate_up_proj = weight_parameter(2 * c.intermediate_size, c.hidden_size)
        self.down_proj = weight_parameter(c.hidden_size, c.intermediate_size)
        self.intermediate_size = c.intermediate_size
        self.packs: dict[str, torch.Tensor | None] = {}  # oneDNN copies of the weights (linear.py)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        cache: torch.Tensor,
        plan: AttentionPlan,
        index: int,
    ) -> torch.Tensor:
        T = x.shape[0]
        p = self.packs
        qkv = linear(self.input_layernorm(x), self.qkv_proj, p.get("qkv"), self.qkv_bias)
        qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(T, -1, self.head_dim), cos, sin)
        q = qk[:, : self.num_heads]
        k = qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        write_kv(cache, slots, k, v)
        attn = paged_attention(q, k, v, cache, plan, index)
        x = linear_add(attn, self.o_proj, p.get("o"), x)
        act = silu_mul(
            self.post_attention_layernorm(x), self.gate_up_proj, p.get("gate"), p.get("up")
        )
        return linear_add(act, self.down_proj, p.get("down"), x)

    def pack_weights(self) -> None:
        self.packs = {
            name: pack(w)
            for name, w in (
                ("qkv", self.qkv_proj),
                ("o", self.o_proj),
                ("gate", self.gate_up_proj[: self.intermediate_size]),
                ("up", self.gate_up_proj[self.intermediate_size :]),
                ("down", self.down_proj),
            )
        }


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size), requires_grad=False
        )
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else weight_parameter(config.vocab_size, config.hidden_size)
        )
        # float32 whatever the model dtype (kept out of .to() on purpose); moved to the input's
        # device on use
        self.rope_cos, self.rope_sin = rope_tables(
            config, min(config.max_position_embeddings, _ROPE_TABLE_LIMIT)
        )
        self._gather_buffer: torch.Tensor | None = None
        self._packed = False
        self._head_pack: torch.Tensor | None = None

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight``, ...) in,
        fusing q/k/v and gate/up. Raises :class:`WeightLoadError` on an unknown name, a wrong
        shape, or a tensor missing at the end."""
        self.drop_packs()
        c = self.config
        expected = _expected_names(c)
        seen: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue  # some tied checkpoints still carry the (identical) head
            target = self._target(name)
            if target is None:
                raise WeightLoadError(f"checkpoint tensor {name!r} has no place in a Llama model")
            param, row0, rows = target
            want = (rows, *param.shape[1:]) if rows is not None else tuple(param.shape)
            if tuple(tensor.shape) != want:
                raise WeightLoadError(
                    f"{name}: shape {tuple(tensor.shape)} but the config implies {want}"
                )
            with torch.no_grad():
                dest = param if rows is None else param[row0 : row0 + rows]
                dest.copy_(tensor)
            seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            raise WeightLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def pack_weights(self) -> None:
        """Prepack the linear weights for oneDNN (CPU, float32; a no-op elsewhere). ``forward``
        does it on first use; call again after changing weights in place."""
        for layer in self.layers:
            layer.pack_weights()  # type: ignore[operator]
        self._head_pack = pack(self.embed_tokens if self.lm_head is None else self.lm_head)
        self._packed = True

    def drop_packs(self) -> None:
        for layer in self.layers:
            layer.packs = {}  # type: ignore[assignment]
        self._head_pack = None
        self._packed = False

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.drop_packs()  # .to() / .float() / ... make new weights: repack on next forward
        return super()._apply(fn, *args, **kwargs)

    def _target(self, name: str) -> tuple[torch.Tensor, int, int | None] | None:
        c = self.config
        if name == "model.embed_tokens.weight":
            return self.embed_tokens, 0, None
        if name == "model.norm.weight":
            return self.norm.weight, 0, None
        if name == "lm_head.weight" and self.lm_head is not None:
            return self.lm_head, 0, None
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None
        index = int(parts[2])
        if index >= len(self.layers):
            return None
        layer: DecoderLayer = self.layers[index]  # type: ignore[assignment]
        rest = ".".join(parts[3:])
        q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
        table = {
            "input_layernorm.weight": (layer.input_layernorm.weight, 0, None),
            "post_attention_layernorm.weight": (layer.post_attention_layernorm.weight, 0, None),
            "self_attn.q_proj.weight": (layer.qkv_proj, 0, q),
            "self_attn.k_proj.weight": (layer.qkv_proj, q, kv),
            "self_attn.v_proj.weight": (layer.qkv_proj, q + kv, kv),
            "self_attn.o_proj.weight": (layer.o_proj, 0, None),
            "mlp.gate_proj.weight": (layer.gate_up_proj, 0, inter),
            "mlp.up_proj.weight": (layer.gate_up_proj, inter, inter),
            "mlp.down_proj.weight": (layer.down_proj, 0, None),
        }
        if layer.qkv_bias is not None:
            table.update(
                {
                    "self_attn.q_proj.bias": (layer.qkv_bias, 0, q),
                    "self_attn.k_proj.bias": (layer.qkv_bias, q, kv),
                    "self_attn.v_proj.bias": (layer.qkv_bias, q + kv, kv),
                }
            )
        return table.get(rest)

    # ------------------------------------------------------------------ running

    def make_kv_caches(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """One zeroed ``[2, num_blocks * block_size, num_kv_heads, head_dim]`` tensor per layer."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}"
            )
        c = self.config
        dtype = dtype or self.embed_tokens.dtype
        device = self.embed_tokens.device
        return [
            torch.zeros(
                2, num_blocks * block_size, c.num_kv_heads, c.head_dim, dtype=dtype, device=device
            )
            for _ in range(c.num_layers)
        ]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Run ``input_ids [T]`` at ``positions [T]``; return the final-normed hidden ``[T, H]``."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} KV caches, got {len(kv_caches)}")
        T = input_ids.shape[0]
        if positions.shape[0] != T or meta.slot_mapping.shape[0] != T or sum(meta.query_lens) != T:
            raise ValueError(
                "input_ids, positions, slot_mapping and query_lens disagree on token count"
            )
        if not self._packed:
            self.pack_weights()
        plan = self._plan(meta, kv_caches[0])
        cos, sin = self._rope(positions)
        x = F.embedding(input_ids, self.embed_tokens)
        slots = meta.slot_mapping
        for index, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, cos, sin, slots, cache, plan, index)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, H]`` (from :meth:`forward`) -> logits ``[N, V]`` (float32)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return linear(hidden, head, self._head_pack).float()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = int(positions.max()) if positions.numel() else 0
        if top >= self.rope_cos.shape[0]:
            if top >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {top} exceeds the model's context "
                    f"({self.config.max_position_embeddings})"
                )
            self.rope_cos, self.rope_sin = rope_tables(self.config, top + 1)
        if self.rope_cos.device != positions.device:
            self.rope_cos = self.rope_cos.to(positions.device)
            self.rope_sin = self.rope_sin.to(positions.device)
        dtype = self.embed_tokens.dtype
        cos = self.rope_cos.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.rope_sin.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin

    def _plan(self, meta: AttentionMetadata, cache: torch.Tensor) -> AttentionPlan:
        plan = build_plan(meta, cache)
        plan.workspace = self._workspace(plan.workspace_numel, cache)
        return plan

    def _workspace(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        ws = self._gather_buffer
        if ws is None or ws.numel() < numel or ws.dtype != like.dtype or ws.device != like.device:
            ws = self._gather_buffer = like.new_empty(max(numel, 1))
        return ws


def _expected_names(c: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not c.tie_word_embeddings:
        names.add("lm_head.weight")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    if c.attention_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    for i in range(c.num_layers):
        names.update(f"model.layers.{i}.{p}" for p in per_layer)
    return names
