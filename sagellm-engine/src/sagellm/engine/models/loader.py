"""Weights of a model source as Hugging Face-named float32 tensors, plus its ModelConfig.

GGUF files are read with :class:`~.gguf_file.GGUFFile`; tensor names are mapped to the
Hugging Face names the model expects, shapes come back in torch order, and the rows of
Q and K that llama.cpp's converter permutes for its rotary layout are put back.
Safetensors folders are read tensor by tensor with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from sagellm.core.errors import ModelNotFoundError
from sagellm.core.types import PackedWeight
from sagellm.engine.models.config import ModelConfig
from sagellm.engine.models.gguf_file import GGUFFile
from sagellm.engine.models.source import ModelSource

__all__ = [
    "Progress",
    "gguf_to_hf_name",
    "load_gguf",
    "load_safetensors",
    "load_weights",
    "read_config",
    "permute_qk",
    "unpermute_qk",
]

#: Progress callback: (stage, done, total), e.g. ("dequantize", 12, 272).
Progress = Callable[[str, int, int], None]

_GGUF_LAYER = {
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
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor ``name``; None for tensors the model ignores."""
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None  # e.g. rope_freqs.weight: recomputed from the config


def permute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter layout: interleave the two rotary halves of each head's rows."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk`: back to the half-split rotary layout."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


#: GGML types kept as :class:`PackedWeight` for methods that compute on them.
_PACKED_TYPES = frozenset({"q4_0", "q4_1", "q8_0"})


def _packed(f: GGUFFile, name: str) -> PackedWeight | None:
    t = f.tensors[name]
    fmt = t.type_name.lower()
    if fmt not in _PACKED_TYPES or len(t.shape) != 2:
        return None
    rows, cols = t.shape
    return PackedWeight(fmt, f.raw(name).view(rows, -1), (rows, cols))


def load_gguf(
    path: Path, progress: Progress | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], GGUFFile, dict[str, PackedWeight]]:
    """Config, float32 Hugging Face-named weights, the parsed file, and the quantized
    blocks (as :class:`PackedWeight`, same names) of the tensors stored quantized."""
    if progress is not None:
        progress("parse", 0, 1)
    f = GGUFFile(path)
    if progress is not None:
        progress("parse", 1, 1)
    cfg = _gguf_config(f)
    # llama.cpp permutes Q/K rows for the llama architecture only (qwen2 keeps the layout)
    permuted = cfg.architecture in ("llama", "mistral")
    weights: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    total = len(f.tensors)
    for i, name in enumerate(f.tensors):
        hf = gguf_to_hf_name(name)
        if hf is not None:
            w = f.tensor(name)
            p = _packed(f, name)
            heads = None
            if permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
                heads = cfg.num_heads
            elif permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
                heads = cfg.num_kv_heads
            if heads is not None:
                # rows are independent: the blocks of each row move with it
                w = unpermute_qk(w, heads)
                if p is not None:
                    p = PackedWeight(p.format, unpermute_qk(p.data, heads), p.shape)
            weights[hf] = w
            if p is not None:
                packed[hf] = p
        if progress is not None:
            progress("dequantize", i + 1, total)
    return cfg, weights, f, packed


def load_safetensors(
    folder: Path, progress: Progress | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 weights of a Hugging Face safetensors folder."""
    from safetensors import safe_open

    cfg = _hf_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors files")
    handles = [safe_open(str(p), framework="pt") for p in files]
    keys = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (not a dict)
    weights: dict[str, torch.Tensor] = {}
    for i, (h, k) in enumerate(keys):
        weights[k] = h.get_tensor(k).float()
        if progress is not None:
            progress("read", i + 1, len(keys))
    return cfg, weights


def _gguf_config(f: GGUFFile) -> ModelConfig:
    names = set(f.tensors)
    return ModelConfig.from_gguf(
        f.metadata,
        has_output="output.weight" in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )


def _hf_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json")
    return ModelConfig.from_hf(json.loads(cfg_path.read_text()))


def read_config(source: ModelSource) -> ModelConfig:
    """The model's config alone (a GGUF header or ``config.json``), no weights read."""
    if source.kind == "gguf":
        return _gguf_config(GGUFFile(source.path))
    return _hf_config(source.path)


def load_weights(
    source: ModelSource, progress: Progress | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, PackedWeight]]:
    """Config, float32 Hugging Face-named weights of ``source``, and the quantized blocks
    of the weights the checkpoint stores quantized (GGUF; empty for safetensors)."""
    if source.kind == "gguf":
        cfg, weights, _, packed = load_gguf(source.path, progress)
        return cfg, weights, packed
    cfg, weights = load_safetensors(source.path, progress)
    return cfg, weights, {}
