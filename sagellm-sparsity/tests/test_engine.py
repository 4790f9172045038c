"""The sparsifiers on the engine's own model (skipped without sagellm-engine).

A random tiny Llama from the engine's test helpers, pruned by the runtime after loading
(``NativeRuntimeConfig(sparsity=...)``): per-block shapes reach attention, and a
structured model computes exactly what the dense model computes with the same channels
and heads silenced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sagellm.engine")
pytest.importorskip("safetensors")

from sagellm.core.errors import ConfigError  # noqa: E402
from sagellm.core.types import BlockShape  # noqa: E402
from sagellm.sparsity.masks import is_nm_sparse  # noqa: E402

HIDDEN, FFN, HEADS, KV, HD = 128, 256, 8, 2, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sagellm.engine.testing import make_tiny_llama

    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny"),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_heads=HEADS,
        num_kv_heads=KV,
        num_layers=2,
    )


def _runtime(model_dir: Path, sparsity: str | None = None, quantization: str = "none") -> Any:
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    cfg = NativeRuntimeConfig(
        model=str(model_dir),
        dtype="float32",
        quantization=quantization,
        kernels="eager",
        sparsity=sparsity,
    )
    return NativeRuntime(cfg)


_IDS = [5, 77, 123, 9, 250, 31, 64, 200, 17, 3, 99, 150]


def test_structured_pruning_equals_the_dense_model_with_those_units_silenced(
    model_dir: Path,
) -> None:
    spec = (
        "structured,ffn_sparsity=0.5,head_sparsity=0.5,reconstruct=none,channel_multiple=32,"
        "calibration_tokens=256"
    )
    pruned = _runtime(model_dir, spec)
    dense = _runtime(model_dir)
    assert set(pruned.block_shapes) == {0, 1}
    for index, shape in pruned.block_shapes.items():
        assert shape.num_kv_heads == KV and shape.num_heads == 4
        p_layer, d_layer = pruned.model.layers[index], dense.model.layers[index]
        assert p_layer.num_heads == p_layer.attn.num_heads == 4 and p_layer.attn.group == 2
        # which channels and heads were kept: their rows were copied exactly
        d_gu, p_gu = d_layer.gate_up_proj.weight, p_layer.gate_up_proj.weight
        kept = [int((d_gu[:FFN] == row).all(dim=1).nonzero()[0]) for row in p_gu[: len(p_gu) // 2]]
        assert len(kept) == shape.intermediate_size
        q_rows = p_layer.qkv_proj.weight[: shape.num_heads * HD].reshape(-1, HD, HIDDEN)
        d_q = d_layer.qkv_proj.weight[: HEADS * HD].reshape(HEADS, HD, HIDDEN)
        heads = [int((d_q == h).all(dim=(1, 2)).nonzero()[0]) for h in q_rows]
        assert [h // (HEADS // KV) for h in heads] == [0, 0, 1, 1]  # two per KV group
        with torch.no_grad():
            gone = torch.ones(FFN, dtype=torch.bool)
            gone[kept] = False
            d_layer.down_proj.weight[:, gone] = 0.0
            cols = torch.ones(HEADS * HD, dtype=torch.bool)
            for h in heads:
                cols[h * HD : (h + 1) * HD] = False
            d_layer.o_proj.weight[:, cols] = 0.0
    got, want = pruned.run_sequence(_IDS), dense.run_sequence(_IDS)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_masking_sparsifiers_through_the_runtime(model_dir: Path) -> None:
    rt = _runtime(model_dir, "wanda,pattern=2:4,calibration_tokens=256")
    assert rt.block_shapes == {} and rt.pruned_fraction == pytest.approx(0.5, abs=1e-3)
    for name, layer in rt.model.projections().items():
        if name.startswith("layers."):
            assert is_nm_sparse(layer.weight, 2, 4), name
    assert torch.isfinite(rt.run_sequence(_IDS)).all()
    rt = _runtime(model_dir, "magnitude,sparsity=0.3")
    assert rt.pruned_fraction == pytest.approx(0.3, abs=2e-3)


def test_a_pruned_model_can_then_be_quantized(model_dir: Path) -> None:
    spec = "structured,ffn_sparsity=0.25,channel_multiple=64,calibration_tokens=256"
    pruned = _runtime(model_dir, spec)
    both = _runtime(model_dir, spec, quantization="int8")
    assert both.quantization == "int8"
    assert (
        both.block_shapes
        == pruned.block_shapes
        == {
            0: BlockShape(192, HEADS, KV),
            1: BlockShape(192, HEADS, KV),
        }
    )
    assert both.model.layers[0].down_proj.method.name != "dense"
    a, b = pruned.run_sequence(_IDS), both.run_sequence(_IDS)
    assert float((a.argmax(-1) == b.argmax(-1)).double().mean()) >= 0.9


def test_bad_specs_say_what_to_write(model_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _runtime(model_dir, "wanda,0.5")
    assert str(info.value) == "sparsity 'wanda,0.5': option '0.5' of 'wanda,0.5' is not key=value"
    with pytest.raises(ConfigError, match="N:M"):
        _runtime(model_dir, "magnitude,pattern=3of4")
