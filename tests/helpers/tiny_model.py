"""A tiny random-weight Llama written to disk in the real formats, for tests to load.

* :func:`write_hf_folder`: a Hugging Face folder (``config.json``, ``model.safetensors``,
  ``tokenizer.json``, ``tokenizer_config.json`` with a ChatML chat template,
  ``generation_config.json``) that ``transformers`` loads too.
* :func:`write_gguf`: the same weights as a GGUF file (written with the ``gguf`` package) in
  F32, F16, BF16, Q8_0, Q4_0 or Q4_1, with the Q/K permutation llama.cpp's converter applies,
  and the tokenizer as ``gpt2`` metadata (``tokenizer.ggml.pre = "smollm"``).
* :func:`gguf_roundtrip`: weights after quantize -> dequantize with ``gguf.quants``, to build
  an HF folder that holds exactly what a GGUF file holds.

The tokenizer is a byte-level BPE trained on a fixed little corpus (digits split one by one,
like SmolLM2's), with ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at ids 0, 1, 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Ferry moves prompts and tokens between prefill and decode workers.",
    "Numbers like 12345 and 2024 are split into single digits: 9 8 7.",
    (
        "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, \u00fcber sch\u00f6n, "
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8."
    ),
    "Emoji \U0001f600 \U0001f680 and symbols like <tag> {json: true} [1, 2] (a + b) * c.",
    "user assistant system: You are a helpful assistant. What is the capital of France?",
    "  leading spaces\tand tabs\nnew lines\n\nand more text, it's what we'll test.",
]


@dataclass
class TinyLlama:
    """A tiny model's config and weights (HF names, float32 numpy) and its tokenizer."""

    config: dict
    weights: dict[str, np.ndarray]
    tokenizer: Tokenizer = field(repr=False)

    @property
    def num_heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def num_kv_heads(self) -> int:
        return self.config["num_key_value_heads"]


def build_tokenizer(vocab_size: int = 384) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def make_tiny_llama(
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> TinyLlama:
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab_size()
    head_dim = hidden_size // num_heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab, hidden_size, std=1.0)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + normal(hidden_size, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + normal(hidden_size, std=0.1)
        w[p + "self_attn.q_proj.weight"] = normal(num_heads * head_dim, hidden_size, std=0.15)
        w[p + "self_attn.k_proj.weight"] = normal(num_kv_heads * head_dim, hidden_size, std=0.15)
        w[p + "self_attn.v_proj.weight"] = normal(num_kv_heads * head_dim, hidden_size, std=0.15)
        w[p + "self_attn.o_proj.weight"] = normal(hidden_size, num_heads * head_dim, std=0.1)
        w[p + "mlp.gate_proj.weight"] = normal(intermediate_size, hidden_size, std=0.1)
        w[p + "mlp.up_proj.weight"] = normal(intermediate_size, hidden_size, std=0.1)
        w[p + "mlp.down_proj.weight"] = normal(hidden_size, intermediate_size, std=0.1)
    w["model.norm.weight"] = 1.0 + normal(hidden_size, std=0.1)
    if not tie_word_embeddings:
        w["lm_head.weight"] = normal(vocab, hidden_size, std=0.15)
    return TinyLlama(config=config, weights=w, tokenizer=tokenizer)


def write_hf_folder(
    tiny: TinyLlama, folder: Path, weights: dict[str, np.ndarray] | None = None, shards: int = 1
) -> Path:
    """Write ``tiny`` (or ``weights`` in its place) as a Hugging Face model folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = tiny.weights if weights is None else weights
    (folder / "config.json").write_text(json.dumps(tiny.config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]})
    )
    names = sorted(weights)
    if shards == 1:
        save_file(
            {n: np.ascontiguousarray(weights[n]) for n in names},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(
                {n: np.ascontiguousarray(weights[n]) for n in part},
                str(folder / fname),
                metadata={"format": "pt"},
            )
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    tiny.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|im_end|>",
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": tiny.config["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    return folder


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K permutation (rotate_half -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    return f"blk.{parts[2]}." + _GGUF_NAMES[".".join(parts[3:])]


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def gguf_roundtrip(tiny: TinyLlama, qtype: str) -> dict[str, np.ndarray]:
    """Weights as a GGUF file of ``qtype`` holds them (2-D tensors quantized, norms float32)."""
    import gguf

    out = {}
    for name, w in tiny.weights.items():
        if w.ndim == 1 or qtype == "F32":
            out[name] = w.copy()
        else:
            q = gguf.quants.quantize(w, _qtype(qtype))
            out[name] = gguf.quants.dequantize(q, _qtype(qtype)).astype(np.float32).reshape(w.shape)
    return out


def write_gguf(
    tiny: TinyLlama,
    path: Path,
    qtype: str = "F32",
    name: str = "tiny-llama",
    zero_blocks: dict[str, str] | None = None,
) -> Path:
    """Write ``tiny`` as a llama-architecture GGUF file with 2-D tensors in ``qtype``.
    ``zero_blocks`` maps HF tensor names to a ggml type to store them as all-zero blocks of
    (for types gguf's Python code cannot quantize, to test how a loader refuses them)."""
    import gguf

    c = tiny.config
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_vocab_size(c["vocab_size"])
    _add_tokenizer(writer, tiny.tokenizer)
    for hf, w in tiny.weights.items():
        if hf.endswith("self_attn.q_proj.weight"):
            w = _permute_qk(w, c["num_attention_heads"])
        elif hf.endswith("self_attn.k_proj.weight"):
            w = _permute_qk(w, c["num_key_value_heads"])
        if zero_blocks and hf in zero_blocks:
            qt = _qtype(zero_blocks[hf])
            values, nbytes = gguf.GGML_QUANT_SIZES[qt]
            blocks = np.zeros((w.shape[0], w.shape[1] // values * nbytes), dtype=np.uint8)
            writer.add_tensor(gguf_name(hf), blocks, raw_dtype=qt)
        elif w.ndim == 1 or qtype == "F32":
            writer.add_tensor(gguf_name(hf), np.ascontiguousarray(w, dtype=np.float32))
        elif qtype == "F16":
            writer.add_tensor(gguf_name(hf), w.astype(np.float16))
        else:
            qt = _qtype(qtype)
            writer.add_tensor(gguf_name(hf), gguf.quants.quantize(w, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer: Tokenizer) -> None:
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * tokenizer.get_vocab_size()
    for token, index in vocab.items():
        tokens[index] = token
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def hf_reference(folder: Path, gguf_file: str | None = None):
    """``transformers``' LlamaForCausalLM for the folder (or GGUF file in it), fp32, eager."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return model.eval()
