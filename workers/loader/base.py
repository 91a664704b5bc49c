"""What every loader returns, and the error a bad model path raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.tokenizer import Tokenizer

EXPECTED_INPUT = (
    "a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or a .gguf file"
)


class ModelLoadError(ValueError):
    """A model path Ferry cannot load; the message says what to pass instead."""


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    name: str  # folder name, or the .gguf file name without its suffix
    source: Path
