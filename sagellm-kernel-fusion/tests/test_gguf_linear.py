"""The GGUF block kernel against references built from the blocks' own definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import PackedWeight
from sagellm.kernel_fusion.config import FusedKernelsConfig
from sagellm.kernel_fusion.extension import load_kernels
from sagellm.kernel_fusion.gguf import BLOCK_FORMATS, GGUFBlockLinear, repack_blocks
from sagellm.kernel_fusion.provider import FusedKernels

needs_compiler = pytest.mark.skipif(load_kernels() is None, reason="no C++ compiler here")


def make_blocks(fmt: str, n: int, k: int, seed: int) -> tuple[PackedWeight, torch.Tensor]:
    """Random GGUF blocks of ``fmt`` for an ``n x k`` weight and that weight, decoded by
    the format's definition (Q4_0: d * (q - 8); Q4_1: d * q + m; Q8_0: d * q)."""
    packed, w, _ = make_blocks_and_terms(fmt, n, k, seed)
    return packed, w


def make_blocks_and_terms(
    fmt: str, n: int, k: int, seed: int
) -> tuple[PackedWeight, torch.Tensor, torch.Tensor]:
    """:func:`make_blocks` and each weight's constant term (``-8 d``, ``m`` or 0)."""
    g = torch.Generator().manual_seed(seed)
    nb = k // 32
    d = (torch.rand(n, nb, generator=g) * 0.02 + 0.001).half()
    d_bytes = d.view(torch.uint8).reshape(n, nb, 2)
    if fmt == "q8_0":
        q = torch.randint(-127, 128, (n, nb, 32), generator=g, dtype=torch.int8)
        raw = torch.cat([d_bytes, q.view(torch.uint8)], -1)
        w = d.float().unsqueeze(-1) * q.float()
        c = torch.zeros(n, nb)
    else:
        q = torch.randint(0, 16, (n, nb, 32), generator=g, dtype=torch.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)  # byte j: element j low, j + 16 high
        if fmt == "q4_1":
            m = (torch.randn(n, nb, generator=g) * 0.05).half()
            raw = torch.cat([d_bytes, m.view(torch.uint8).reshape(n, nb, 2), qs], -1)
            w = d.float().unsqueeze(-1) * q.float() + m.float().unsqueeze(-1)
            c = m.float()
        else:
            raw = torch.cat([d_bytes, qs], -1)
            w = d.float().unsqueeze(-1) * (q.float() - 8)
            c = -8 * d.float()
    packed = PackedWeight(format=fmt, data=raw.reshape(n, -1).contiguous(), shape=(n, k))
    return packed, w.reshape(n, k), c.repeat_interleave(32, dim=1)


def rounded_input(x: torch.Tensor, input_bits: int) -> torch.Tensor:
    """``x`` as the kernel sees it: per block of 32, steps of amax / 127 (8 bits) or
    amax / 32767 (16 bits)."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    qmax = 127 if input_bits == 8 else 32767
    # float32 operations in the kernel's order (its division by qmax is a product with the
    # float32 reciprocal), so ties round alike
    step = blocks.abs().amax(-1, keepdim=True) * torch.tensor(1 / qmax, dtype=torch.float32)
    inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    out = torch.round(blocks * inv) * step
    return torch.where(step > 0, out, torch.zeros_like(out)).reshape(x.shape)


class _Layer(nn.Module):
    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.packed = packed
        self.bias = bias


@needs_compiler
@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(sorted(BLOCK_FORMATS)),
    rows=st.integers(1, 11),
    n=st.sampled_from([1, 16, 37]),
    nb=st.integers(1, 5),
    input_bits=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_block_kernel_equals_float_arithmetic_on_the_rounded_input(
    fmt: str, rows: int, n: int, nb: int, input_bits: int, seed: int
) -> None:
    k = 32 * nb
    packed, w, terms = make_blocks_and_terms(fmt, n, k, seed)
    layer = _Layer(packed)
    method = GGUFBlockLinear(input_bits)
    method.process_weights(layer)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1))
    x[0, :32] = 0.0  # an all-zero block has no scale
    # the codes meet the rounded input; the blocks' constant terms meet the exact input
    # (its float sum per block)
    codes_part = (w - terms).double()
    expected = rounded_input(x, input_bits).double() @ codes_part.t()
    expected += x.double() @ terms.double().t()
    got = method.apply(layer, x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    tol = 1e-4 * float(expected.abs().max()) + 1e-6
    assert float((got.double() - expected).abs().max()) <= tol


@needs_compiler
@pytest.mark.parametrize("fmt", sorted(BLOCK_FORMATS))
def test_sixteen_bit_inputs_match_the_float_product(fmt: str) -> None:
    packed, w = make_blocks(fmt, 64, 576, seed=3)
    layer = _Layer(packed)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(4))
    exact = x.double() @ w.double().t()
    scale = float(exact.abs().max())
    method = GGUFBlockLinear(16)
    method.process_weights(layer)
    err16 = float((method.apply(layer, x).double() - exact).abs().max()) / scale
    method8 = GGUFBlockLinear(8)
    method8.process_weights(layer)
    err8 = float((method8.apply(layer, x).double() - exact).abs().max()) / scale
    assert err16 < 1e-4
    assert err8 > 20 * err16  # the second digit is what buys the precision


@needs_compiler
def test_block_kernel_keeps_batch_shape_bias_and_bfloat16() -> None:
    packed, w = make_blocks("q4_1", 32, 64, seed=5)
    bias = torch.arange(32, dtype=torch.float32)
    layer = _Layer(packed, bias)
    method = GGUFBlockLinear()
    assert isinstance(method, LinearMethod)
    method.process_weights(layer)
    x = torch.randn(2, 3, 64)
    y = method.apply(layer, x)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, x @ w.t() + bias, rtol=1e-4, atol=1e-4)
    layer.bias = bias.bfloat16()  # a bf16 model's bias
    yb = method.apply(layer, x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), x.bfloat16().float() @ w.t() + bias, rtol=2e-2, atol=0.2)


def test_repack_reads_each_formats_fields() -> None:
    packed, w = make_blocks("q4_0", 2, 64, seed=6)
    codes, d, c, bits = repack_blocks(packed)
    assert (codes.dtype, tuple(codes.shape), bits) == (torch.uint8, (2, 32), 4)
    assert d.dtype == c.dtype == torch.float16  # as the blocks store them
    assert torch.equal(c.float(), -8 * d.float())  # exact in float16
    # a Q4_0 scale whose -8 d leaves float16's range is refused with what to do
    big = packed.data.clone().reshape(2, 2, 18)
    big[0, 0, 0:2] = torch.tensor([9000.0], dtype=torch.float16).view(torch.uint8)
    with pytest.raises(ValueError, match="overflow the kernel's float16 terms"):
        repack_blocks(PackedWeight(format="q4_0", data=big.reshape(2, 36), shape=(2, 64)))
    packed8, _ = make_blocks("q8_0", 2, 64, seed=7)
    codes8, d8, c8, bits8 = repack_blocks(packed8)
    assert (codes8.dtype, tuple(codes8.shape), tuple(d8.shape), c8.numel(), bits8) == (
        torch.int8,
        (2, 64),
        (2, 2),
        0,
        8,
    )


def test_repack_rejects_other_formats_and_misfit_blocks() -> None:
    raw = torch.zeros(2, 22, dtype=torch.uint8)
    with pytest.raises(ValueError, match="GGUF q5_0 blocks have no block kernel; formats: q4_0"):
        repack_blocks(PackedWeight(format="q5_0", data=raw, shape=(2, 32)))
    with pytest.raises(ValueError, match=r"expected uint8 \[2, 40\]"):
        repack_blocks(PackedWeight(format="q4_1", data=raw, shape=(2, 64)))


@needs_compiler
def test_block_method_needs_the_layers_blocks_and_a_valid_input_width() -> None:
    with pytest.raises(ValueError, match=r"needs the layer's GGUF blocks \(layer.packed\)"):
        GGUFBlockLinear().process_weights(nn.Module())
    with pytest.raises(ValueError, match="input_bits must be 8 or 16, got 4"):
        GGUFBlockLinear(4)
    packed, _ = make_blocks("q4_1", 16, 64, seed=8)
    layer = _Layer(packed)
    method = GGUFBlockLinear()
    method.process_weights(layer)
    with pytest.raises(RuntimeError, match="K=48 is not a multiple of 32"):
        method.apply(layer, torch.randn(1, 48))


@needs_compiler
def test_provider_offers_the_block_kernel_by_format_and_config() -> None:
    kernels = FusedKernels()
    assert "gguf_linear" in kernels.available_ops()
    make = kernels.get("gguf_linear")
    assert isinstance(make("q4_0"), GGUFBlockLinear)
    assert make("q6_k") is None
    assert make("q8_0").input_bits == 16
    assert (
        FusedKernels(FusedKernelsConfig(gguf_input_bits=8)).get("gguf_linear")("q4_1").input_bits
        == 8
    )
    assert "gguf_linear" not in FusedKernels(FusedKernelsConfig(gguf_blocks=False)).available_ops()
