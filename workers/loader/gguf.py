"""Read a GGUF file (llama.cpp's model format) and load it as a Llama-family model.

File layout (version 2 and 3, little-endian): magic ``GGUF``, ``u32`` version, ``u64`` tensor
count, ``u64`` metadata count; the metadata key/values (a key is a ``u64``-length string, then a
``u32`` value type and the value; arrays carry their element type and ``u64`` count); the
tensor infos (name, ``u32`` dims, ``u64`` extent per dim, fastest-varying first, ``u32`` ggml
type, ``u64`` offset); padding to ``general.alignment`` (default 32); then the tensor data, each
tensor at its offset from that point. The file is memory-mapped; tensors are dequantized to
float32 one at a time while the model loads.

llama.cpp's converter permutes the rows of Q and K for the ``llama`` architecture (its RoPE
rotates interleaved pairs, Hugging Face's rotates halves); the loader undoes it so the model's
``rotate_half`` RoPE gives the same result.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from workers.loader.base import LoadedModel, ModelLoadError
from workers.loader.gguf_quants import UnsupportedQuantError, dequantize, tensor_nbytes, type_name
from workers.model.config import ModelConfig, ModelConfigError
from workers.model.llama import LlamaForCausalLM, WeightLoadError
from workers.tokenizer import Tokenizer, TokenizerError

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: np.bool_,
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFFormatError(ModelLoadError):
    """The file is not a well-formed GGUF file."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first): a weight is [out, in]
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None for types Ferry cannot dequantize

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class GGUFFile:
    """Parsed header of a GGUF file over a read-only memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:
                raise GGUFFormatError(f"{self.path} is empty, not a GGUF file") from None
        self._pos = 0
        try:
            self._parse()
        except struct.error:
            raise GGUFFormatError(f"{self.path} ends in the middle of its GGUF header") from None

    def close(self) -> None:
        """Unmap now, or -- while arrays from :meth:`raw` still view the map -- when they go."""
        try:
            self._map.close()
        except BufferError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ parsing

    def _read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        raw = self._map[self._pos : self._pos + n]
        if len(raw) != n:
            raise struct.error("short string")
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._read(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            elem, count = self._read("<I"), self._read("<Q")
            if elem in _NUMPY:
                dtype = np.dtype(_NUMPY[elem])
                arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos)
                self._pos += dtype.itemsize * count
                return arr.tolist()
            if elem == _STRING:
                return [self._string() for _ in range(count)]
            return [self._value(elem) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown GGUF metadata value type {kind}")

    def _parse(self) -> None:
        if self._map[:4] != b"GGUF":
            raise GGUFFormatError(
                f"{self.path} is not a GGUF file (magic {bytes(self._map[:4])!r})"
            )
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(
                f"{self.path}: GGUF version {self.version} is not supported (2 or 3)"
            )
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            infos.append((name, tuple(reversed(dims)), self._read("<I"), self._read("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, kind, offset in infos:
            try:
                nbytes: int | None = tensor_nbytes(kind, int(np.prod(shape)), name)
            except UnsupportedQuantError:
                nbytes = None
            start = data_start + offset
            if nbytes is not None and start + nbytes > len(self._map):
                raise GGUFFormatError(f"{self.path}: tensor {name} runs past the end of the file")
            self.tensors[name] = GGUFTensor(name, shape, kind, start, nbytes)

    # ------------------------------------------------------------------ data

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8, read-only view of the map)."""
        t = self.tensors[name]
        nbytes = t.nbytes if t.nbytes is not None else tensor_nbytes(t.ggml_type, 1, name)
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=t.offset)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a float32 array of its numpy shape (an owned copy)."""
        t = self.tensors[name]
        out = dequantize(self.raw(name), t.ggml_type, int(np.prod(t.shape)), name).reshape(t.shape)
        return out if out.flags.writeable else out.copy()  # F32 is a read-only view of the map


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> rotate_half halves)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def gguf_config(f: GGUFFile) -> ModelConfig:
    factors = None
    if "rope_freqs.weight" in f.tensors:
        factors = tuple(float(x) for x in f.tensor("rope_freqs.weight").reshape(-1))
    embed = f.tensors.get("token_embd.weight")
    try:
        return ModelConfig.from_gguf_metadata(
            f.metadata,
            vocab_size=embed.shape[0] if embed is not None else None,
            tie_word_embeddings="output.weight" not in f.tensors,
            rope_freq_factors=factors,
        )
    except ModelConfigError as e:
        raise ModelLoadError(f"{f.path}: {e}") from None


def iter_gguf_weights(
    f: GGUFFile, config: ModelConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under its Hugging Face name, dequantized, Q/K un-permuted for ``llama``."""
    permuted = f.metadata.get("general.architecture") == "llama"
    for name in f.tensors:
        if name == "rope_freqs.weight":
            continue
        target = hf_name(name)
        if target is None:
            raise ModelLoadError(f"{f.path}: tensor {name!r} has no place in a Llama model")
        w = f.tensor(name)
        if permuted and target.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config.num_heads)
        elif permuted and target.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config.num_kv_heads)
        yield target, torch.from_numpy(np.ascontiguousarray(w)).to(dtype)


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    with GGUFFile(path) as f:
        config = gguf_config(f)
        try:
            tokenizer = Tokenizer.from_gguf_metadata(f.metadata, name=path.stem)
        except TokenizerError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        model = LlamaForCausalLM(config).to(dtype)
        try:
            model.load_weights(iter_gguf_weights(f, config, dtype))
        except (WeightLoadError, UnsupportedQuantError) as e:
            raise ModelLoadError(f"{path}: {e}") from None
    model.eval()
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, name=path.stem, source=path)
