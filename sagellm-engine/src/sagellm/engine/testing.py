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

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tiny_gguf", "make_tiny_llama"]

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


def make_tiny_gguf(model_dir: Path, path: Path, *, weight_type: str = "F32") -> Path:
    """Write the checkpoint of ``model_dir`` (from :func:`make_tiny_llama`) as a GGUF file.

    The layout is llama.cpp's: its tensor names, reversed shapes, Q/K rows permuted for
    its rotary layout (llama architecture), the tokenizer as metadata (byte-level BPE,
    ``pre = gpt2``) and the chat template. ``weight_type`` is "F32", "F16", "Q8_0",
    "Q4_0" or "Q4_1" for the 2-D matrices (norms stay F32). Returns ``path``.
    """
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from sagellm.engine.models.loader import permute_qk

    model_dir, path = Path(model_dir), Path(path)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    arch = cfg["model_type"]
    weights = load_file(str(model_dir / "model.safetensors"))
    qtype = gguf.GGMLQuantizationType[weight_type]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = tok["model"]["vocab"]
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    specials = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, tensor in weights.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{layer_names[rest]}"
        else:
            gname = names[name]
        t = tensor.float()
        if arch == "llama" and gname.endswith("attn_q.weight"):
            t = permute_qk(t, cfg["num_attention_heads"])
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            t = permute_qk(t, cfg["num_key_value_heads"])
        data = t.numpy().astype(np.float32)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            packed = gguf.quants.quantize(data, qtype)
            w.add_tensor(gname, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
