"""AWQ: the error objective is exact, the search never loses to round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.testing.quantizer import activations, make_linear
from sagellm.quantization.awq import AWQQuantizer, awq_quantize, output_error
from sagellm.quantization.config import AWQConfig
from sagellm.quantization.formats import int4_rtn, unpack_int4
from sagellm.quantization.methods import ScaledInt4Method


def _layer_and_inputs(
    n: int = 128, k: int = 256, t: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * k**-0.5
    return w, activations(k, t, seed=1)


def test_output_error_is_the_squared_error_of_the_outputs() -> None:
    w, x = _layer_and_inputs(16, 64, 50)
    wq = w + 0.01 * torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    direct = float(((x.double() @ (w - wq).double().t()) ** 2).sum())
    assert output_error(w, wq, x.t() @ x) == pytest.approx(direct, rel=1e-5)


def test_a_grid_of_one_is_round_to_nearest() -> None:
    w, x = _layer_and_inputs()
    res = awq_quantize(w, x.t() @ x, x.abs().mean(0), 64, grid=1, clip=False)
    q, scale, zero = int4_rtn(w, 64)
    assert res.alpha == 0.0 and torch.equal(res.q, q)
    # s = 1 up to its normalisation (max(s) * min(s) = 1 with s constant)
    assert torch.allclose(res.input_scale, torch.ones(256))
    assert res.error == pytest.approx(res.rtn_error)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_round_to_nearest_on_outlier_channels(group: int, bits: int) -> None:
    w, x = _layer_and_inputs()
    xtx = x.t() @ x
    res = awq_quantize(w, xtx, x.abs().mean(0), group, bits=bits)
    rtn = output_error(w, unpack_int4(*int4_rtn(w, group, bits=bits)), xtx)
    assert res.rtn_error == pytest.approx(rtn)
    wq = unpack_int4(res.q, res.scale, res.zero) * res.input_scale
    assert output_error(w, wq, xtx) == pytest.approx(res.error, rel=1e-4)
    assert res.error < 0.8 * rtn  # measured: 0.5-0.7 of RTN's squared output error
    assert 0.0 < res.alpha < 1.0


def test_the_clip_search_never_makes_it_worse() -> None:
    w, x = _layer_and_inputs()
    xtx = x.t() @ x
    plain = awq_quantize(w, xtx, x.abs().mean(0), 64, clip=False)
    clipped = awq_quantize(w, xtx, x.abs().mean(0), 64, clip=True)
    assert clipped.error <= plain.error


def _tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_quantizer_end_to_end_folds_the_scales_into_the_input() -> None:
    cfg = AWQConfig(group_size=32, dense_min_rows=None, calibration_tokens=1024)
    layer = make_linear(128, 256, seed=3)
    w = layer.weight.detach().clone()
    layers = {"layers.0.down_proj": layer}

    def run(token_ids: list[int]) -> None:
        layer(activations(256, len(token_ids), seed=sum(token_ids)))

    quantizer = AWQQuantizer(cfg, tokenize=_tokenize)
    quantizer.prepare(layers, run)
    assert not layer._forward_pre_hooks
    method = quantizer.linear_method("layers.0.down_proj", layer)
    assert isinstance(method, ScaledInt4Method) and method.name == "awq_int4_g32"
    method.process_weights(layer)
    x = activations(256, 512, seed=77)
    ref = x @ w.t()
    awq = float((method.apply(layer, x) - ref).norm())
    rtn = float((x @ unpack_int4(*int4_rtn(w, 32)).t() - ref).norm())
    assert awq < 0.9 * rtn
    assert quantizer.profile().method == "awq"


def test_quantizer_needs_run_and_tokenize() -> None:
    layers = {"layers.0.o_proj": make_linear(32, 64)}
    with pytest.raises(ValueError, match=r"needs run\(token_ids\)"):
        AWQQuantizer(tokenize=_tokenize).prepare(layers, None)
    with pytest.raises(ValueError, match="tokenize="):
        AWQQuantizer().prepare(layers, lambda ids: None)
    with pytest.raises(ValueError, match="no int4 group size divides 40"):
        AWQQuantizer(tokenize=_tokenize).prepare({"x": make_linear(32, 40)}, lambda ids: None)
