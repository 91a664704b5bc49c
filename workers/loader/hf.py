"""Load a Hugging Face model folder: ``config.json`` (+ ``generation_config.json``), weights in
``*.safetensors`` (one file, or shards listed by ``model.safetensors.index.json``), and the
tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the chat template)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from workers.loader.base import EXPECTED_INPUT, LoadedModel, ModelLoadError
from workers.model.config import ModelConfig, ModelConfigError
from workers.model.llama import LlamaForCausalLM, WeightLoadError
from workers.tokenizer import Tokenizer, TokenizerError


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass {EXPECTED_INPUT}")
    try:
        cfg = json.loads(path.read_text())
        gen_path = folder / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        return ModelConfig.from_hf_config(cfg, gen)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    except ModelConfigError as e:
        raise ModelLoadError(f"{folder}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are not there: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = (
            " (PyTorch .bin checkpoints are not read: convert them to safetensors)"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise ModelLoadError(f"{folder} has no *.safetensors weights{extra}; pass {EXPECTED_INPUT}")
    return files


def iter_safetensors(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, f.get_tensor(name).to(dtype)


def load_hf_folder(folder: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    config = read_hf_config(folder)
    files = safetensors_files(folder)
    model = LlamaForCausalLM(config).to(dtype)
    try:
        model.load_weights(iter_safetensors(files, dtype))
    except WeightLoadError as e:
        raise ModelLoadError(f"{folder}: {e}") from None
    model.eval()
    try:
        tokenizer = Tokenizer.from_hf_folder(folder, eos_token_ids=config.eos_token_ids)
    except TokenizerError as e:
        raise ModelLoadError(str(e)) from None
    return LoadedModel(
        config=config, model=model, tokenizer=tokenizer, name=folder.name, source=folder
    )
