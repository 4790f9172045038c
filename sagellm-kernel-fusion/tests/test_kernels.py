"""The fused provider's ops against eager references (exact to the stated tolerances)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from sagellm.core.protocols import KernelProvider, LinearMethod
from sagellm.kernel_fusion.config import FusedKernelsConfig
from sagellm.kernel_fusion.extension import load_kernels
from sagellm.kernel_fusion.onednn import (
    OneDNNInt8Linear,
    OneDNNLinear,
    int8_linear_available,
    onednn_available,
)
from sagellm.kernel_fusion.provider import FusedKernels

needs_compiler = pytest.mark.skipif(load_kernels() is None, reason="no C++ compiler here")


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Per sequence: gather its positions' keys and values, float32 softmax attention."""
    _, block_size, hkv, d = k_cache.shape
    out = torch.empty_like(q)
    group = q.shape[1] // hkv
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        pos = torch.arange(n)
        blocks = block_tables[b].long()[pos // block_size]
        k = k_cache[blocks, pos % block_size].float()  # [n, hkv, d]
        v = v_cache[blocks, pos % block_size].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float() * scale, k)
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out


@needs_compiler
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 3]),
    block_size=st.sampled_from([1, 4, 16]),
    lens=st.lists(st.integers(1, 40), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
    dtypes=st.sampled_from(
        [
            (torch.float32, torch.float32),
            (torch.bfloat16, torch.bfloat16),
            (torch.float32, torch.bfloat16),
        ]
    ),
    d=st.sampled_from([16, 64, 128]),  # bf16 with 32 | D: the vdpbf16ps path
)
def test_paged_decode_attention_matches_the_gathered_reference(
    batch: int,
    kv_heads: int,
    group: int,
    block_size: int,
    lens: list[int],
    seed: int,
    dtypes: tuple[torch.dtype, torch.dtype],
    d: int,
) -> None:
    qdt, cdt = dtypes
    g = torch.Generator().manual_seed(seed)
    lens_t = torch.tensor(lens[:batch], dtype=torch.int32)
    width = int((lens_t.max() + block_size - 1) // block_size)
    num_blocks = batch * width + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(cdt)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(cdt)
    # every sequence gets its own blocks, scattered through the pool
    tables = torch.randperm(num_blocks, generator=g)[: batch * width].view(batch, width)
    tables = tables.to(torch.int32).contiguous()
    q = torch.randn(batch, kv_heads * group, d, generator=g).to(qdt)
    kernel = FusedKernels().get("paged_decode_attention")
    got = kernel(q, k_cache, v_cache, tables, lens_t, d**-0.5)
    want = reference_decode_attention(q, k_cache, v_cache, tables, lens_t, d**-0.5)
    tol = 1e-5 if qdt == torch.float32 else 1e-2
    assert got.dtype == qdt and got.shape == q.shape
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


@needs_compiler
@pytest.mark.parametrize("dtype,d", [(torch.float32, 8), (torch.bfloat16, 64)])
def test_paged_decode_attention_reads_only_the_table_blocks(dtype: torch.dtype, d: int) -> None:
    # blocks outside the table hold NaN: a kernel that read them would return NaN
    k_cache = torch.full((6, 4, 1, d), float("nan"), dtype=dtype)
    v_cache = torch.full((6, 4, 1, d), float("nan"), dtype=dtype)
    k_cache[2] = 1.0
    v_cache[2] = torch.arange(float(d)).to(dtype)
    k_cache[5, :1] = 1.0
    v_cache[5, :1] = 100.0
    tables = torch.tensor([[2, 5]], dtype=torch.int32)
    q = torch.ones(1, 1, d, dtype=dtype)
    out = FusedKernels().get("paged_decode_attention")(
        q, k_cache, v_cache, tables, torch.tensor([5], dtype=torch.int32), 8 / d
    )
    # five equal scores: the mean of four rows arange(d) and one row of 100
    want = (4 * torch.arange(float(d)) + 100.0) / 5
    assert torch.allclose(out[0, 0].float(), want, atol=1e-5, rtol=1e-2)


@needs_compiler
def test_paged_decode_attention_rejects_bad_inputs_with_a_message() -> None:
    kernel = FusedKernels().get("paged_decode_attention")
    q = torch.ones(1, 2, 8)
    cache = torch.ones(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="must be int32"):
        kernel(q, cache, cache, torch.tensor([[0]]), torch.tensor([1], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="head_dim"):
        kernel(
            torch.ones(1, 2, 4),
            cache,
            cache,
            torch.tensor([[0]], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32),
            1.0,
        )


def quantized_cache(
    num_blocks: int, block_size: int, kv_heads: int, d: int, g: torch.Generator
) -> torch.Tensor:
    """An int8 cache whose rows are d random values and then a float16 scale (2 bytes)."""
    values = torch.randint(-127, 128, (num_blocks, block_size, kv_heads, d), generator=g)
    scales = torch.rand(num_blocks, block_size, kv_heads, 1, generator=g) * 0.03 + 0.002
    scale_bytes = scales.to(torch.float16).view(torch.int8)
    return torch.cat([values.to(torch.int8), scale_bytes], -1).contiguous()


def dequantize(cache: torch.Tensor) -> torch.Tensor:
    """Float32 values of an int8 cache with row scales: value * scale."""
    d = cache.shape[-1] - 2
    return cache[..., :d].float() * cache[..., d:].contiguous().view(torch.float16).float()


@needs_compiler
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    kv_heads=st.sampled_from([1, 3]),
    group=st.sampled_from([1, 3, 9]),  # 9 query heads per KV head: the scalar path
    block_size=st.sampled_from([1, 4, 16]),
    d=st.sampled_from([8, 16, 64]),  # 8: not a multiple of 16, the scalar path
    lens=st.lists(st.integers(1, 40), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    qdt=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_paged_decode_attention_reads_int8_caches_with_their_row_scales(
    batch: int,
    kv_heads: int,
    group: int,
    block_size: int,
    d: int,
    lens: list[int],
    seed: int,
    qdt: torch.dtype,
) -> None:
    g = torch.Generator().manual_seed(seed)
    lens_t = torch.tensor(lens[:batch], dtype=torch.int32)
    width = int((lens_t.max() + block_size - 1) // block_size)
    num_blocks = batch * width + 3
    k_cache = quantized_cache(num_blocks, block_size, kv_heads, d, g)
    v_cache = quantized_cache(num_blocks, block_size, kv_heads, d, g)
    tables = torch.randperm(num_blocks, generator=g)[: batch * width].view(batch, width)
    tables = tables.to(torch.int32).contiguous()
    q = torch.randn(batch, kv_heads * group, d, generator=g).to(qdt)
    kernel = FusedKernels().get("paged_decode_attention")
    got = kernel(q, k_cache, v_cache, tables, lens_t, d**-0.5)
    # the reference dequantizes the whole cache first, then attends in float32
    want = reference_decode_attention(
        q.float(), dequantize(k_cache), dequantize(v_cache), tables, lens_t, d**-0.5
    )
    assert got.dtype == qdt and got.shape == q.shape
    # float32: summation order only (the kernel scales a row's dot product, not its values)
    tol = 1e-5 if qdt == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)


@needs_compiler
def test_paged_decode_attention_int8_applies_each_rows_scale() -> None:
    # one KV head, head_dim 16, four positions: equal keys (equal scores), values all 1
    # with row scales 1, 2, 3, 4, so the output is their mean
    d = 16

    def rows(scales: list[float]) -> torch.Tensor:
        s = torch.tensor(scales, dtype=torch.float16).view(1, len(scales), 1, 1)
        ones = torch.ones(1, len(scales), 1, d, dtype=torch.int8)
        return torch.cat([ones, s.view(torch.int8)], -1).contiguous()

    out = FusedKernels().get("paged_decode_attention")(
        torch.ones(1, 1, d),
        rows([1.0] * 4),
        rows([1.0, 2.0, 3.0, 4.0]),
        torch.tensor([[0]], dtype=torch.int32),
        torch.tensor([4], dtype=torch.int32),
        1.0,
    )
    assert torch.allclose(out[0, 0], torch.full((d,), 2.5), atol=1e-6)


@needs_compiler
def test_paged_decode_attention_needs_the_scale_columns_of_an_int8_cache() -> None:
    kernel = FusedKernels().get("paged_decode_attention")
    no_scales = torch.ones(2, 4, 1, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="an int8 cache holds D \\+ 2"):
        kernel(
            torch.ones(1, 2, 8),
            no_scales,
            no_scales,
            torch.tensor([[0]], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32),
            1.0,
        )


class _Layer(nn.Module):
    def __init__(self, n: int, k: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(n * k)
        self.weight: torch.Tensor | None = nn.Parameter(
            torch.randn(n, k, generator=g).to(dtype), requires_grad=False
        )
        self.bias = nn.Parameter(torch.randn(n, generator=g).to(dtype)) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear_at_every_row_count(dtype: torch.dtype, bias: bool) -> None:
    if not onednn_available(dtype):
        pytest.skip(f"oneDNN linear unavailable for {dtype}")
    layer = _Layer(96, 64, bias, dtype)
    assert layer.weight is not None
    w = layer.weight.detach().clone()
    method = OneDNNLinear(batch_hint=16)
    assert isinstance(method, LinearMethod)
    method.process_weights(layer)
    assert layer.weight is None  # one copy of the weight, the blocked one
    for m in (1, 3, 16, 100):
        x = torch.randn(m, 64).to(dtype)
        before = x.clone()
        got = method.apply(layer, x)
        want = F.linear(x, w, layer.bias)
        assert torch.equal(x, before)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), want.float(), atol=tol * 10, rtol=tol)


def test_onednn_linear_needs_a_float_weight() -> None:
    layer = _Layer(16, 16, False, torch.float32)
    layer.weight = None
    with pytest.raises(ValueError, match="needs the layer's float weight"):
        OneDNNLinear().process_weights(layer)


needs_int8 = pytest.mark.skipif(
    load_kernels() is None or not int8_linear_available(), reason="no oneDNN int8 product here"
)


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 10_000),
    zero_row=st.booleans(),
)
def test_quantize_per_row_rounds_each_row_on_its_own_scale(
    rows: int, cols: int, dtype: torch.dtype, seed: int, zero_row: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * 10 ** torch.randn(rows, 1, generator=g)).to(dtype)
    if zero_row:
        x[0] = 0
    module = load_kernels()
    q, s = module.quantize_per_row(x)
    assert q.dtype == torch.uint8 and s.dtype == torch.float32
    assert q.shape == (rows, cols) and s.shape == (rows,)
    xf = x.float()
    amax = xf.abs().amax(1)
    want_s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    assert torch.allclose(s, want_s, rtol=2e-7, atol=0)  # amax / 127, to the last bit or so
    scaled = xf * (1 / s)[:, None]
    want_q = torch.round(scaled).to(torch.int32) + 128
    # exact, except within float32 rounding of a tie (x.5): the kernel's reciprocal and
    # product (compiled with -ffast-math) may land on the other side of it
    near_tie = ((scaled - scaled.floor()) - 0.5).abs() <= 4e-7 * scaled.abs().clamp(min=1)
    off = (q.to(torch.int32) - want_q).abs()
    assert torch.all(off <= near_tie.to(torch.int32)), (off.max(), scaled[off > 0])
    codes = q.to(torch.int32) - 128
    assert int(codes.abs().max()) <= 127
    if zero_row:
        assert float(s[0]) == 1.0 and bool((q[0] == 128).all())
    # every value within half a step of its row's scale
    err = (codes.float() * s[:, None] - xf).abs()
    assert bool((err <= s[:, None] * 0.5 * (1 + 1e-5)).all())


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_the_product_of_its_quantized_operands(
    dtype: torch.dtype, bias: bool
) -> None:
    """W8A8: the exact integer product of the per-row input codes and the per-channel
    weight codes, scaled by both scales (then the bias), rounded once to the dtype."""
    layer = _Layer(96, 64, bias, dtype)
    assert layer.weight is not None
    w = layer.weight.detach().float()
    method = OneDNNInt8Linear(batch_hint=16)
    assert isinstance(method, LinearMethod)
    method.process_weights(layer)
    assert layer.weight is None and layer.int8_scales.shape == (96,)
    amax = w.abs().amax(1)
    assert torch.equal(layer.int8_scales, amax / 127)
    qw = torch.round(w / (amax / 127)[:, None]).clamp(-127, 127).double()
    module = load_kernels()
    for m in (1, 3, 16, 100):
        x = torch.randn(m, 64).to(dtype)
        before = x.clone()
        got = method.apply(layer, x)
        assert torch.equal(x, before) and got.dtype == dtype and got.shape == (m, 96)
        q, s = module.quantize_per_row(x)
        acc = (q.double() - 128) @ qw.T  # exact: integers well inside float64's range
        want = acc * layer.int8_scales.double()[None, :] * s.double()[:, None]
        if layer.bias is not None:
            want = want + layer.bias.double()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
        # and it stays near the float product (the quantization error of 8-bit operands)
        ref = F.linear(x.float(), w, None if layer.bias is None else layer.bias.float())
        rel = float((got.float() - ref).norm() / ref.norm())
        assert rel < 0.05


@needs_int8
def test_int8_linear_keeps_the_leading_dims_and_refuses_a_missing_weight() -> None:
    layer = _Layer(32, 64, False, torch.float32)
    method = OneDNNInt8Linear()
    method.process_weights(layer)
    x = torch.randn(2, 3, 64)
    assert method.apply(layer, x).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="needs the layer's float weight"):
        method.process_weights(layer)  # the float weight is gone


def test_the_int8_product_is_offered_only_when_asked_for() -> None:
    assert "int8_dense_linear" not in FusedKernels().available_ops()
    provider = FusedKernels(FusedKernelsConfig(int8_dense_linear=True))
    if load_kernels() is None or not int8_linear_available():
        assert "int8_dense_linear" not in provider.available_ops()
        return
    make = provider.get("int8_dense_linear")
    assert isinstance(make(torch.bfloat16), OneDNNInt8Linear)
    assert make(torch.float16) is None


def test_provider_implements_the_protocol_and_names_missing_ops() -> None:
    provider = FusedKernels()
    assert isinstance(provider, KernelProvider)
    with pytest.raises(KeyError, match="'rotary' is not provided here"):
        provider.get("rotary")
    off = FusedKernels(FusedKernelsConfig(onednn_linear=False, compiled_kernels=False))
    assert off.available_ops() == ()
    with pytest.raises(KeyError):
        off.get("dense_linear")


def _eager_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[1],), w, eps)
    return F.rms_norm(x.float(), (x.shape[1],), None, eps).to(x.dtype) * w


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(7, 96), (70, 100), (1, 576)])
def test_fused_norms_match_eager(dtype: torch.dtype, rows: int, width: int) -> None:
    """Widths that are not a multiple of the 16 vector lanes included (masked tails)."""
    ops = FusedKernels().get("fused_layer_ops")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, width, generator=g).to(dtype)
    r = torch.randn(rows, width, generator=g).to(dtype)
    w = (torch.rand(width, generator=g) + 0.5).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(
        ops.rms_norm(x, w, 1e-5).float(), _eager_rms(x, w, 1e-5).float(), atol=tol, rtol=tol
    )
    want_res = x + r
    want = _eager_rms(want_res, w, 1e-5)
    r_in = r.clone()
    out, res = ops.add_rms_norm(x, r_in, w, 1e-5)
    assert res.data_ptr() == r_in.data_ptr()  # the residual is updated in place
    assert torch.equal(res, want_res)
    assert torch.allclose(out.float(), want.float(), atol=tol, rtol=tol)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(5, 48), (70, 50), (3, 1536)])
def test_fused_silu_and_mul_matches_eager(dtype: torch.dtype, rows: int, width: int) -> None:
    ops = FusedKernels().get("fused_layer_ops")
    x = torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(2)).to(dtype) * 4
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ops.silu_and_mul(x).float(), want.float(), atol=tol, rtol=tol)


@needs_compiler
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_fused_rotary_writes_rotated_keys_and_values_into_their_slots(
    dtypes: tuple[torch.dtype, torch.dtype],
) -> None:
    adt, cdt = dtypes
    ops = FusedKernels().get("fused_layer_ops")
    h, hkv, d, bs, t = 3, 1, 8, 4, 5
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(adt)
    positions = torch.tensor([0, 1, 2, 9, 10])
    slots = torch.tensor([4, 5, 6, 13, 2])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(16).float(), inv)
    cos, sin = freqs.cos(), freqs.sin()
    k_cache = torch.zeros(4, bs, hkv, d, dtype=cdt)
    v_cache = torch.zeros(4, bs, hkv, d, dtype=cdt)
    x = qkv.float().view(t, h + 2 * hkv, d)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    x1, x2 = x[:, : h + hkv, : d // 2], x[:, : h + hkv, d // 2 :]
    rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    ops.rotary_write_kv(qkv, positions, cos, sin, h, hkv, k_cache, v_cache, slots)
    tol = 1e-6 if adt == torch.float32 and cdt == torch.float32 else 2e-2
    got = qkv.float().view(t, h + 2 * hkv, d)
    assert torch.allclose(got[:, : h + hkv], rot, atol=tol, rtol=tol)
    assert torch.equal(got[:, h + hkv :], x[:, h + hkv :])  # v is not rotated
    kf = k_cache.view(-1, hkv, d).float()
    vf = v_cache.view(-1, hkv, d).float()
    assert torch.allclose(kf[slots], rot[:, h:], atol=tol, rtol=tol)
    assert torch.allclose(vf[slots], x[:, h + hkv :], atol=tol, rtol=tol)
    untouched = sorted(set(range(16)) - set(slots.tolist()))
    assert torch.equal(kf[untouched], torch.zeros(len(untouched), hkv, d))
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        ops.rotary_write_kv(
            qkv, torch.tensor([0, 1, 2, 3, 16]), cos, sin, h, hkv, k_cache, v_cache, slots
        )


#: Largest magnitude of each quantized cache type.
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize_reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[..., D]`` as D quantized values and a float16 scale (amax / qmax)."""
    tiny, big = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
    scale = (x.abs().amax(-1, keepdim=True) / QMAX[dtype]).clamp(tiny, big).half()
    y = (x / scale.float()).clamp(-QMAX[dtype], QMAX[dtype])
    values = y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)
    return torch.cat([values, scale.view(dtype)], -1)


@needs_compiler
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cdt", list(QMAX))
def test_fused_rotary_quantizes_keys_and_values_into_a_quantized_cache(
    adt: torch.dtype, cdt: torch.dtype
) -> None:
    ops = FusedKernels().get("fused_layer_ops")
    h, hkv, d, bs, t = 6, 2, 16, 4, 5
    g = torch.Generator().manual_seed(4)
    qkv = (torch.randn(t, (h + 2 * hkv) * d, generator=g) * 3).to(adt)
    positions = torch.tensor([0, 1, 2, 9, 10])
    slots = torch.tensor([4, 5, 6, 13, 2])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(16).float(), inv)
    cos, sin = freqs.cos(), freqs.sin()
    # the float reference: the same rotation into a float cache of the activation dtype
    ref_qkv = qkv.clone()
    k_ref = torch.zeros(4, bs, hkv, d, dtype=adt)
    v_ref = torch.zeros(4, bs, hkv, d, dtype=adt)
    ops.rotary_write_kv(ref_qkv, positions, cos, sin, h, hkv, k_ref, v_ref, slots)
    k_cache = torch.zeros(4, bs, hkv, d + 2, dtype=cdt)
    v_cache = torch.zeros(4, bs, hkv, d + 2, dtype=cdt)
    ops.rotary_write_kv(qkv, positions, cos, sin, h, hkv, k_cache, v_cache, slots)
    assert torch.equal(qkv, ref_qkv)  # q and k rotated alike
    for cache, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        got = cache.view(-1, hkv, d + 2)[slots]
        want = quantize_reference(ref.view(-1, hkv, d)[slots].float(), cdt)
        # the scales exactly; values exactly but for an x / scale on a rounding boundary
        # (the kernel is built with -ffast-math)
        assert torch.equal(got[..., d:].view(torch.int8), want[..., d:].view(torch.int8))
        steps = (got[..., :d].float() - want[..., :d].float()).abs()
        if cdt == torch.int8:
            assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
        else:
            rel = steps / want[..., :d].float().abs().clamp_min(1e-6)
            assert rel.max() <= 2.0 ** -(2 if cdt == torch.float8_e4m3fn else 1)
            assert (steps > 0).float().mean() < 0.01
        untouched = sorted(set(range(16)) - set(slots.tolist()))
        assert torch.all(cache.view(-1, hkv, d + 2)[untouched].view(torch.int8) == 0)
    with pytest.raises(RuntimeError, match="a quantized cache's rows hold D \\+ 2"):
        bad = torch.zeros(4, bs, hkv, d, dtype=torch.int8)
        ops.rotary_write_kv(qkv, positions, cos, sin, h, hkv, bad, bad.clone(), slots)


@needs_compiler
def test_fingerprint_names_the_compiled_build() -> None:
    """The provider names the build of its compiled kernels (a digest of sources, torch,
    flags and CPU), so measured choices are tied to it; none without compiled kernels."""
    module = load_kernels()
    assert module is not None
    fp = FusedKernels().fingerprint
    assert fp == module.__name__ and fp.startswith("sagellm_kernels_") and len(fp) == 32
    assert FusedKernels(FusedKernelsConfig(compiled_kernels=False)).fingerprint == ""
