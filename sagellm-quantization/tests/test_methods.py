"""The weight-only methods: dense fallback, float32 values, errors with clear messages."""

from __future__ import annotations

import pytest
import torch
from blocks import random_packed
from torch.nn import functional as F

from sagellm.core.testing.quantizer import make_linear
from sagellm.quantization.formats import int4_rtn, unpack_int4
from sagellm.quantization.methods import Int4Method, Int8Method, ScaledInt4Method


def _x(m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("method_class", [Int4Method, Int8Method])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_fallback_from_dense_min_rows(method_class: type, dtype: str) -> None:
    layer = make_linear(64, 128, bias=True, seed=1, dtype=dtype)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    method = method_class(dense_min_rows=8)
    method.process_weights(layer)
    dt = getattr(torch, dtype)
    at = _x(8, 128, dt)
    assert torch.equal(method.apply(layer, at), F.linear(at, w, b))  # 8 rows: float weight
    below = _x(7, 128, dt)
    y = method.apply(layer, below)
    assert not torch.equal(y, F.linear(below, w, b))  # 7 rows: quantized
    assert float((y.float() - F.linear(below, w, b).float()).norm()) > 0


def test_no_dense_fallback_drops_the_float_weight() -> None:
    layer = make_linear(64, 128, seed=2, dtype="bfloat16")
    method = Int4Method(64, dense_min_rows=None)
    method.process_weights(layer)
    assert layer.weight is None and layer.qweight.dtype == torch.uint8
    x = _x(40, 128, torch.bfloat16)
    assert method.apply(layer, x).shape == (40, 64)


def test_float32_layers_compute_on_the_quantized_values() -> None:
    """No vectorised float32 int4 kernel: the float32 values of the codes, exactly."""
    layer = make_linear(64, 128, seed=3)
    w = layer.weight.detach().clone()
    method = Int4Method(32, dense_min_rows=None, bits=3)
    method.process_weights(layer)
    deq = unpack_int4(*int4_rtn(w, 32, bits=3))
    assert torch.equal(layer.dequantized, deq)
    x = _x(5, 128)
    assert torch.equal(method.apply(layer, x), F.linear(x, deq))


def test_int8_float32_runs_the_kernel_at_one_row_and_the_values_above() -> None:
    layer = make_linear(64, 128, seed=4)
    method = Int8Method(dense_min_rows=None)
    method.process_weights(layer)
    deq = layer.dequantized
    x1, x3 = _x(1, 128), _x(3, 128)
    assert torch.allclose(method.apply(layer, x1), x1 @ deq.t(), atol=1e-5)
    assert torch.equal(method.apply(layer, x3), F.linear(x3, deq))


def test_scaled_int4_divides_the_input_by_s() -> None:
    layer = make_linear(32, 64, seed=5, dtype="bfloat16")
    w = layer.weight.detach().float()
    s = torch.linspace(0.5, 2.0, 64)
    q, scale, zero = int4_rtn(w * s, 32)
    method = ScaledInt4Method(32, input_scale=1 / s, qweights=(q, scale, zero), dense_min_rows=None)
    method.process_weights(layer)
    x = _x(3, 64, torch.bfloat16)
    before = x.clone()
    y = method.apply(layer, x).float()
    assert torch.equal(x, before)
    want = (x.float() / s) @ unpack_int4(q, scale, zero).t()
    assert float((y - want).norm() / want.norm()) < 2e-2


def test_group_size_errors_name_what_fits() -> None:
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        Int4Method(48)
    layer = make_linear(32, 96, seed=6)
    with pytest.raises(ValueError, match=r"does not divide the 96 input columns.*\(32\)"):
        Int4Method(64).process_weights(layer)
    with pytest.raises(ValueError, match="multiple of 16"):
        Int8Method(24)


def test_kernel_shapes_are_checked_before_the_kernel_sees_them() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        Int4Method(32).process_weights(make_linear(24, 64))
    # the int8 kernel crashes the process on a width that is not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16 input columns"):
        Int8Method().process_weights(make_linear(32, 40))


def test_missing_weights_and_blocks_are_errors() -> None:
    layer = make_linear(32, 64)
    with pytest.raises(
        ValueError, match="from_gguf needs q4_0/q4_1 blocks on the layer, found none"
    ):
        Int4Method(32, from_gguf=True).process_weights(layer)
    layer.packed = random_packed("q8_0", 32, 64)
    with pytest.raises(ValueError, match="found q8_0"):
        Int4Method(32, from_gguf=True).process_weights(layer)
    layer.weight = None
    with pytest.raises(ValueError, match="no float weight"):
        Int8Method().process_weights(layer)
    with pytest.raises(ValueError, match="dense_min_rows must be at least 2"):
        Int4Method(32, dense_min_rows=1)


def test_handed_over_codes_must_fit_the_layer() -> None:
    q, scale, zero = int4_rtn(torch.randn(32, 64), 32)
    with pytest.raises(ValueError, match="do not fit a 32x128 projection"):
        Int4Method(32, qweights=(q, scale, zero)).process_weights(make_linear(32, 128))


class _RecordingBlocks:
    """A block method standing in for a kernel provider's (records what it is given)."""

    name = "blocks"

    def __init__(self) -> None:
        self.formats: list[str] = []
        self.rows: list[int] = []

    def process_weights(self, layer: torch.nn.Module) -> None:
        self.formats.append(layer.packed.format)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return torch.full((x.shape[0], layer.weight_rows), 7.0)


@pytest.mark.parametrize(
    ("fmt", "method_class", "kwargs"),
    [
        ("q4_1", Int4Method, {"group_size": 32, "from_gguf": True}),
        ("q4_0", Int4Method, {"group_size": 32, "from_gguf": True}),
        ("q8_0", Int8Method, {"group_size": 32, "from_gguf": True}),
    ],
)
def test_gguf_methods_hand_few_row_steps_to_the_layers_block_method(
    fmt: str, method_class: type, kwargs: dict[str, object]
) -> None:
    layer = make_linear(32, 64, seed=5, dtype="float32")
    layer.packed = random_packed(fmt, 32, 64, seed=5)
    layer.weight_rows = 32
    blocks = _RecordingBlocks()
    layer.block_method = blocks
    w = layer.weight.detach().clone()
    method = method_class(dense_min_rows=4, **kwargs)
    method.process_weights(layer)
    assert blocks.formats == [fmt]
    # the block method replaces the method's own kernel: none of its buffers exist
    assert not any(hasattr(layer, b) for b in ("qweight", "scale_zeros", "dequantized"))
    assert method.name.endswith("+blocks")
    assert torch.equal(method.apply(layer, _x(3, 64)), torch.full((3, 32), 7.0))
    assert blocks.rows == [3]
    big = _x(4, 64)
    assert torch.equal(method.apply(layer, big), F.linear(big, w))  # from 4 rows: float
    assert blocks.rows == [3]
    # with the float weight dropped later (a tied table served from the blocks), every
    # row count goes to the blocks
    layer.register_parameter("weight", None)
    assert torch.equal(method.apply(layer, big), torch.full((4, 32), 7.0))
    assert blocks.rows == [3, 4]


def test_without_a_block_method_gguf_methods_use_their_own_kernel() -> None:
    layer = make_linear(32, 64, seed=6, dtype="bfloat16")
    layer.packed = random_packed("q4_1", 32, 64, seed=6)
    method = Int4Method(32, from_gguf=True)
    method.process_weights(layer)
    assert layer.qweight.dtype == torch.uint8 and method.name == "gguf_int4_g32"
