"""ModelConfig: the architecture numbers of a Llama-family model, from either source."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagellm.core.errors import ConfigError

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig"]

#: Architectures the native runtime runs: the Llama family (same block, different options).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")

_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}


@dataclass(frozen=True)
class ModelConfig:
    """Numbers that fix the shapes and the math of a decoder-only Llama-family model."""

    architecture: str  # "llama", "qwen2" or "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the SwiGLU MLP
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when fewer)
    head_dim: int
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3" | "linear", "factor": ..., ...} as in config.json
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # the output head reuses the token embedding
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = field(default=None)  # Mistral; not applied (full attention)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported by the native runtime; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def num_parameters(self) -> int:
        """Weights of the model (the tied head counted once)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * layer + h + head

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary."""
        archs = cfg.get("architectures") or []
        arch = None
        for a in archs:
            arch = _HF_ARCH.get(a)
            if arch:
                break
        if arch is None:
            model_type = cfg.get("model_type", "")
            arch = model_type if model_type in SUPPORTED_ARCHITECTURES else None
        if arch is None:
            raise ConfigError(
                f"config.json describes {archs or cfg.get('model_type')!r}; the native runtime "
                f"runs {', '.join(_HF_ARCH)}"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        # transformers 5 nests theta and scaling under rope_parameters
        rope = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") else None)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(scaling),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            sliding_window=cfg.get("sliding_window") if arch == "mistral" else None,
        )

    @classmethod
    def from_gguf(
        cls, meta: Mapping[str, Any], *, has_output: bool, attention_bias: bool = False
    ) -> ModelConfig:
        """Build from GGUF metadata (``general.architecture`` prefixes the model keys).

        ``has_output``: the file holds ``output.weight`` (else the head is tied);
        ``attention_bias``: it holds q/k/v biases.
        """
        arch = str(meta.get("general.architecture", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"GGUF architecture {arch!r} is not supported by the native runtime; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        kv_heads = int(key("attention.head_count_kv", heads))
        vocab = key("vocab_size")
        if vocab is None:
            vocab = len(meta.get("tokenizer.ggml.tokens", ()))
        scaling: dict[str, Any] | None = None
        scaling_type = key("rope.scaling.type")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor", 1.0))}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(key("attention.key_length", hidden // heads)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings=not has_output,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            attention_bias=attention_bias,
            sliding_window=None,
        )


def _rope_scaling(raw: Any) -> Mapping[str, Any] | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; supported: llama3, linear, none"
        )
    out = {k: v for k, v in raw.items() if k != "rope_theta"}
    out["rope_type"] = kind
    return out
