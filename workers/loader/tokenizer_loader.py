"""The tokenizer and config of a model without its weights (for frontends and mocker workers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.loader.base import EXPECTED_INPUT, ModelLoadError
from workers.loader.gguf import GGUFFile, gguf_config
from workers.loader.hf import read_hf_config
from workers.model.config import ModelConfig
from workers.tokenizer import Tokenizer, TokenizerError


@dataclass(frozen=True)
class ModelInfo:
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    source: Path


def load_model_info(path: str | Path) -> ModelInfo:
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            config = read_hf_config(p)
            tokenizer = Tokenizer.from_hf_folder(p, eos_token_ids=config.eos_token_ids)
            return ModelInfo(config, tokenizer, p.name, p)
        if p.is_file() and p.suffix.lower() == ".gguf":
            with GGUFFile(p) as f:
                config = gguf_config(f)
                tokenizer = Tokenizer.from_gguf_metadata(f.metadata, name=p.stem)
            return ModelInfo(config, tokenizer, p.stem, p)
    except TokenizerError as e:
        raise ModelLoadError(f"{p}: {e}") from None
    raise ModelLoadError(f"model path {str(path)!r} is not a model folder or a .gguf file; "
                         f"pass {EXPECTED_INPUT}")
