"""Model loading: a Hugging Face folder or a GGUF file -> :class:`LoadedModel` (config, torch
model, tokenizer, name, source path).

``load_model(path)`` dispatches on what the path is: a folder (read as a Hugging Face model
folder, which must hold ``config.json``) or a file ending in ``.gguf``. Anything else raises
:class:`ModelLoadError`, a ``ValueError`` whose message says what to pass instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.loader.base import EXPECTED_INPUT, LoadedModel, ModelLoadError
from workers.loader.gguf import load_gguf
from workers.loader.hf import load_hf_folder


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist; pass {EXPECTED_INPUT}")
    if p.is_dir():
        return load_hf_folder(p, dtype)
    if p.suffix.lower() == ".gguf":
        return load_gguf(p, dtype)
    raise ModelLoadError(f"{p} is neither a folder nor a .gguf file; pass {EXPECTED_INPUT}")


__all__ = ["LoadedModel", "ModelLoadError", "load_model"]
