"""Test helpers: a tiny random Llama written to disk like a Hugging Face checkpoint.

Usage::

    from sagellm.engine.testing import make_tiny_llama
    path = make_tiny_llama(tmp_path / "tiny", seed=0)
    llm = LLM(model=str(path), dtype="float32")

The folder holds ``config.json``, ``model.safetensors`` and a byte-level BPE tokenizer
(``tokenizer.json`` + ``tokenizer_config.json`` with a ChatML chat template), so every
path that loads a real model (runtime, tokenizer, engine, server) runs in milliseconds.
The same seed gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tiny_llama"]

#: Ids 0, 1, 2 of the tiny vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: ChatML, as SmolLM2 and Qwen2 use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# merges are learned from this text, so the tokenizer is the same on every machine
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris. "
    "Hello world! Once upon a time there was a small model that answered questions. "
    "What is the answer? The answer is forty two. the of and to in is was that for it "
    "with as his on be at by this had not are but from or have an they which one you were "
)


def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tk.to_str()


def make_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    vocab_size: int = 320,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 1024,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    architecture: str = "llama",
    rms_norm_eps: float = 1e-5,
) -> Path:
    """Write a random Llama-family checkpoint into ``path`` (created) and return ``path``.

    ``architecture`` is "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM: q/k/v
    carry biases). ``vocab_size`` must leave room for 256 byte tokens and 3 specials.
    Weights are drawn with scale ``1/sqrt(fan_in)`` so logits are spread out and tests
    comparing implementations see distinct values.
    """
    import torch
    from safetensors.torch import save_file

    if vocab_size < 259:
        raise ValueError("vocab_size must be at least 259 (256 bytes + 3 special tokens)")
    if architecture not in ("llama", "qwen2"):
        raise ValueError(f"architecture must be 'llama' or 'qwen2', got {architecture!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    head_dim = head_dim or hidden_size // num_heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        s = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=gen) * s

    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    bias = architecture == "qwen2"
    w: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rand(vocab_size, hidden_size, scale=1.0),
        "model.norm.weight": 1.0 + rand(hidden_size, scale=0.1),
    }
    if not tie_word_embeddings:
        w["lm_head.weight"] = rand(vocab_size, hidden_size)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + rand(hidden_size, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + rand(hidden_size, scale=0.1)
        w[p + "self_attn.q_proj.weight"] = rand(q, hidden_size)
        w[p + "self_attn.k_proj.weight"] = rand(kv, hidden_size)
        w[p + "self_attn.v_proj.weight"] = rand(kv, hidden_size)
        if bias:
            w[p + "self_attn.q_proj.bias"] = rand(q, scale=0.1)
            w[p + "self_attn.k_proj.bias"] = rand(kv, scale=0.1)
            w[p + "self_attn.v_proj.bias"] = rand(kv, scale=0.1)
        w[p + "self_attn.o_proj.weight"] = rand(hidden_size, q)
        w[p + "mlp.gate_proj.weight"] = rand(intermediate_size, hidden_size)
        w[p + "mlp.up_proj.weight"] = rand(intermediate_size, hidden_size)
        w[p + "mlp.down_proj.weight"] = rand(hidden_size, intermediate_size)
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))

    config = {
        "architectures": ["Qwen2ForCausalLM" if bias else "LlamaForCausalLM"],
        "model_type": architecture,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text(_tokenizer_json(vocab_size))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[2],
        "pad_token": SPECIAL_TOKENS[0],
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return path
