"""magnitude and wanda: exact masks on small layers, targets, errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sagellm.core import registry
from sagellm.core.testing.quantizer import make_linear
from sagellm.sparsity.config import MagnitudeConfig, WandaConfig
from sagellm.sparsity.pruning import MagnitudeSparsifier, WandaSparsifier, select_targets


def _tok(text: str) -> list[int]:
    return list(text.encode())[:64]


def _model(num_blocks: int = 3) -> dict[str, torch.nn.Module]:
    layers: dict[str, torch.nn.Module] = {}
    for b in range(num_blocks):
        layers[f"layers.{b}.qkv_proj"] = make_linear(24, 8, seed=b, output_sizes=(8, 8, 8))
        layers[f"layers.{b}.o_proj"] = make_linear(8, 8, seed=10 + b)
        layers[f"layers.{b}.gate_up_proj"] = make_linear(32, 8, seed=20 + b, output_sizes=(16, 16))
        layers[f"layers.{b}.down_proj"] = make_linear(8, 16, seed=30 + b)
    layers["lm_head"] = make_linear(12, 8, seed=99)
    return layers


def test_magnitude_zeroes_the_smallest_weights_of_the_layer() -> None:
    w = torch.tensor([[0.5, -3.0, 0.1, 2.0], [-0.2, 1.0, -4.0, 0.3]])
    layer = make_linear(2, 4, weight=w)
    s = MagnitudeSparsifier(MagnitudeConfig(sparsity=0.5, targets=("o_proj",)))
    s.prepare({"layers.0.o_proj": layer})
    assert s.apply({"layers.0.o_proj": layer}) == {}
    # layer-wise: the four smallest |w| of the whole matrix go (two in each row here)
    assert layer.weight.tolist() == [[0.0, -3.0, 0.0, 2.0], [0.0, 1.0, -4.0, 0.0]]


def test_wanda_weighs_by_the_input_norm_per_row() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    layer = make_linear(2, 4, weight=w)
    # channel norms: 10, 1, 1, 0.1 -> scores row 0: 10, 2, 3, 0.4; row 1: 40, 3, 2, 0.1
    x = torch.tensor([[10.0, 1.0, 1.0, 0.1]])
    s = WandaSparsifier(WandaConfig(sparsity=0.5, targets=("o_proj",)), tokenize=_tok)
    s.prepare({"layers.0.o_proj": layer}, lambda ids: layer(x))
    s.apply({"layers.0.o_proj": layer})
    assert layer.weight.tolist() == [[1.0, 0.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0]]
    assert s.stats["layers.0.o_proj"].num_rows == 1  # the whole (short) text in one sequence


def test_wanda_2_of_4_on_a_row() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0]])
    layer = make_linear(1, 8, weight=w)
    x = torch.tensor([[4.0, 1.0, 1.0, 0.5, 1.0, 2.0, 3.0, 4.0]])
    s = WandaSparsifier(WandaConfig(pattern="2:4", targets=("o_proj",)), tokenize=_tok)
    s.prepare({"layers.0.o_proj": layer}, lambda ids: layer(x))
    s.apply({"layers.0.o_proj": layer})
    assert layer.weight.tolist() == [[1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
    assert s.profile().model_dump() == {
        "method": "wanda",
        "pattern": "n:m",
        "sparsity": 0.5,
        "n": 2,
        "m": 4,
        "calibrated": True,
    }


def test_targets_skip_blocks_and_never_the_head() -> None:
    layers = _model(4)
    cfg = MagnitudeConfig(targets=("gate_up_proj", "down_proj"), skip_first=1, skip_last=1)
    assert sorted(select_targets(layers, cfg)) == [
        "layers.1.down_proj",
        "layers.1.gate_up_proj",
        "layers.2.down_proj",
        "layers.2.gate_up_proj",
    ]
    before = {n: layer.weight.clone() for n, layer in layers.items()}
    s = MagnitudeSparsifier(MagnitudeConfig(sparsity=0.3))
    s.prepare(layers)
    s.apply(layers)
    assert torch.equal(layers["lm_head"].weight, before["lm_head"])
    for name in layers:
        if name != "lm_head":
            # 30% of each layer's weights, rounded down
            assert int((layers[name].weight == 0).sum()) == int(layers[name].weight.numel() * 0.3)


def test_wanda_needs_run_and_tokenize_and_prepare() -> None:
    layers = _model(1)
    with pytest.raises(ValueError) as info:
        WandaSparsifier(tokenize=_tok).prepare(layers, None)
    assert str(info.value) == (
        "wanda calibrates on the model's activations: prepare(layers, run) needs "
        "run(token_ids), the dense model's forward over one sequence"
    )
    with pytest.raises(ValueError, match="build the sparsifier with tokenize="):
        WandaSparsifier().prepare(layers, lambda ids: None)
    with pytest.raises(ValueError) as info:
        WandaSparsifier(tokenize=_tok).apply(layers)
    assert str(info.value) == "wanda: call prepare(layers, run) before apply(layers)"


def test_an_nm_pattern_that_does_not_fit_the_columns() -> None:
    layers = {"layers.0.o_proj": make_linear(4, 12)}
    with pytest.raises(ValueError) as info:
        MagnitudeSparsifier(MagnitudeConfig(pattern="4:8")).prepare(layers)
    assert str(info.value) == (
        "layers.0.o_proj: pattern 4:8 groups each row's columns by 8, but the layer has 12 "
        "input columns; use a projection whose input size is a multiple of 8, or the "
        "unstructured pattern"
    )


def test_configs_reject_bad_values() -> None:
    with pytest.raises(ValidationError, match="neither 'unstructured' nor 'N:M'"):
        WandaConfig(pattern="50%")
    with pytest.raises(ValidationError, match="less than or equal to 0.95"):
        MagnitudeConfig(sparsity=0.99)
    with pytest.raises(ValidationError, match="lm_head"):
        MagnitudeConfig(targets=("lm_head",))  # type: ignore[arg-type]


def test_entry_points_build_each_sparsifier() -> None:
    names = {p.name for p in registry.available("sparsity")}
    assert {"magnitude", "wanda", "sparsegpt", "structured"} <= names
    s = registry.load("sparsity", "wanda", {"sparsity": 0.3}, tokenize=_tok)
    assert isinstance(s, WandaSparsifier) and s.config.sparsity == 0.3
