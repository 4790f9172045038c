"""SmoothQuant: the smoothing formula, per-token int8, both product paths."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.testing.quantizer import activations, make_linear
from sagellm.quantization.config import SmoothQuantConfig
from sagellm.quantization.smoothquant import (
    SmoothQuantMethod,
    SmoothQuantQuantizer,
    quantize_per_token,
    smooth_scales,
)


def test_smooth_scales_follow_the_formula() -> None:
    act_max = torch.tensor([4.0, 1.0, 9.0])
    w = torch.tensor([[1.0, -4.0, 1.0], [-0.5, 2.0, -1.0]])  # column maxima 1, 4, 1
    s = smooth_scales(act_max, w, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 3.0]))
    assert torch.allclose(smooth_scales(act_max, w, 1.0), act_max)
    assert torch.allclose(smooth_scales(act_max, w, 0.0), 1 / torch.tensor([1.0, 4.0, 1.0]))


def test_per_token_int8_is_within_half_a_step() -> None:
    x = activations(64, 9, seed=0)
    q, scale = quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.shape == (9, 1)
    assert (q.float() * scale - x).abs().le(scale / 2 * (1 + 1e-6)).all()
    assert torch.equal(q.abs().amax(dim=1), torch.full((9,), 127, dtype=torch.int8))


def _calibrated(alpha: float, dtype: str = "float32", **options: object) -> tuple:
    layer = make_linear(96, 128, bias=True, seed=1, dtype=dtype)
    w, b = layer.weight.detach().float().clone(), layer.bias.detach().float().clone()
    acts = activations(128, 512, seed=2)
    s = smooth_scales(acts.abs().amax(dim=0), w, alpha)
    method = SmoothQuantMethod(s, **options)  # type: ignore[arg-type]
    method.process_weights(layer)
    return layer, method, w, b


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_paths_stay_close_to_the_float_product(dtype: str) -> None:
    layer, method, w, b = _calibrated(0.8, dtype)
    assert layer.weight is None  # W8A8 needs no float weight
    dt = getattr(torch, dtype)
    for m in (1, 8, 16, 64):  # below 16 rows: weight-only int8; from 16: torch._int_mm
        x = activations(128, m, seed=10 + m).to(dt)
        before = x.clone()
        y = method.apply(layer, x)
        assert torch.equal(x, before) and y.dtype == dt and y.shape == (m, 96)
        ref = x.float() @ w.t() + b
        assert float((y.float() - ref).norm() / ref.norm()) < 0.03


def test_large_batches_go_through_int_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, method, _, _ = _calibrated(0.8, w8a8_min_rows=4)
    calls = []
    real = torch._int_mm

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((a.dtype, tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", counting)
    method.apply(layer, activations(128, 3, seed=0))
    assert calls == []
    method.apply(layer, activations(128, 4, seed=0))
    assert calls == [(torch.int8, (4, 128), (128, 96))]


def test_smoothing_helps_with_outlier_channels() -> None:
    """Per-token int8 of raw activations loses the small channels next to the outliers."""
    x = activations(128, 64, seed=5)
    x[:, 7] *= 30.0
    layer = make_linear(96, 128, seed=6)
    w = layer.weight.detach().clone()
    ref = x @ w.t()

    def err(s: torch.Tensor) -> float:
        lay = make_linear(96, 128, weight=w)
        m = SmoothQuantMethod(s, w8a8_min_rows=1)
        m.process_weights(lay)
        return float((m.apply(lay, x) - ref).norm() / ref.norm())

    smoothed = err(smooth_scales(x.abs().amax(dim=0), w, 0.8))
    plain = err(torch.ones(128))
    assert smoothed < 0.75 * plain  # measured: 0.6


def test_quantizer_calibrates_and_checks_shapes() -> None:
    layer = make_linear(96, 128, seed=7)
    layers = {"layers.0.qkv_proj": layer}
    quantizer = SmoothQuantQuantizer(
        SmoothQuantConfig(calibration_tokens=256), tokenize=lambda t: list(t.encode())
    )
    quantizer.prepare(layers, lambda ids: layer(activations(128, len(ids), seed=len(ids))))
    method = quantizer.linear_method("layers.0.qkv_proj", layer)
    assert isinstance(method, SmoothQuantMethod) and method.name == "w8a8_smoothquant"
    p = quantizer.profile()
    assert (p.method, p.weight_bits, p.activation_bits) == ("smoothquant", 8, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantizer.prepare({"x": make_linear(32, 40)}, lambda ids: None)
    with pytest.raises(ValueError, match="tokenize="):
        SmoothQuantQuantizer().prepare(layers, lambda ids: None)
    with pytest.raises(ValueError, match="multiple of 16 input columns"):
        SmoothQuantMethod(torch.ones(40)).process_weights(make_linear(32, 40))
    with pytest.raises(ValueError, match="does not fit 64 input columns"):
        SmoothQuantMethod(torch.ones(40)).process_weights(make_linear(32, 64))
