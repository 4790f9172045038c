"""A Hugging Face folder written from a GGUF file, for peers that cannot read GGUF.

vLLM reads safetensors folders, not llama.cpp's quantized GGUF; guidellm needs a
tokenizer folder. :func:`export_hf_folder` writes one from the engine's own loader: the
GGUF blocks dequantized (Q/K rows already put back in Hugging Face's rotary layout) and
cast to bfloat16, a ``config.json`` with the Llama-family fields of the engine's
:class:`~sagellm.engine.models.config.ModelConfig`, and the tokenizer that transformers
builds from the file's metadata. The folder is cached: a stamp file records the source
file's size and modification time, and a matching stamp skips the work.

Usage::

    from sagellm.engine.models.source import resolve_model
    folder = export_hf_folder(resolve_model("smollm2-135m"))  # ~/.cache/sagellm/hf-smollm2-135m
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sagellm.core.errors import ConfigError

__all__ = ["default_export_dir", "export_hf_folder", "hf_config"]

_STAMP = "sagellm-export.json"
_HF_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}


def default_export_dir(name: str) -> Path:
    """``$SAGELLM_CACHE_DIR/hf-<name>`` (default ``~/.cache/sagellm/hf-<name>``)."""
    root = os.environ.get("SAGELLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sagellm"
    )
    return Path(root) / f"hf-{name}"


def hf_config(cfg: Any, dtype: str = "bfloat16") -> dict[str, Any]:
    """The ``config.json`` of a :class:`ModelConfig` (Llama, Mistral or Qwen2 fields)."""
    arch, model_type = _HF_ARCH[cfg.architecture]
    eos: int | list[int] | None
    eos = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else None
    if len(cfg.eos_token_ids) == 1:
        eos = cfg.eos_token_ids[0]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "rms_norm_eps": float(f"{cfg.rms_norm_eps:.6g}"),  # GGUF stores it as float32
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.architecture == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out


def _stamp_of(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"source": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": 1}


def export_hf_folder(
    source: Any, dest: Path | None = None, *, progress: Any = None, force: bool = False
) -> Path:
    """The Hugging Face folder of GGUF ``source`` (a ModelSource), written once.

    A safetensors source is already such a folder and is returned as it is.
    """
    if source.kind != "gguf":
        return Path(source.path)
    dest = Path(dest) if dest is not None else default_export_dir(source.name)
    stamp = _stamp_of(Path(source.path))
    stamp_file = dest / _STAMP
    if not force and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return dest
        except ValueError:
            pass
    if progress is not None:
        progress(f"writing a Hugging Face copy of {source.path.name} to {dest}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from sagellm.engine.models.loader import load_gguf

    cfg, weights, _, _ = load_gguf(Path(source.path))
    if cfg.architecture not in _HF_ARCH:
        raise ConfigError(f"no Hugging Face export for architecture {cfg.architecture!r}")
    dest.mkdir(parents=True, exist_ok=True)
    if stamp_file.exists():
        stamp_file.unlink()  # a half-written folder must not look complete
    tensors = {
        name: w.to(torch.bfloat16).contiguous()
        for name, w in weights.items()
        if not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_config(cfg)["eos_token_id"]}
    (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    tok.save_pretrained(str(dest))
    stamp_file.write_text(json.dumps(stamp) + "\n")
    return dest
