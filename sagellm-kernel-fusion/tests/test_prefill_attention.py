"""``prefill_attention`` (causal flash attention of a chunk) against a float32 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.kernel_fusion.extension import load_kernels
from sagellm.kernel_fusion.provider import FusedKernels

module = load_kernels()
#: dtypes with a kernel here: bfloat16 needs AVX512-BF16, float32 AVX2 + FMA
DTYPES = [
    dt
    for dt in (torch.bfloat16, torch.float32)
    if module is not None and module.prefill_attention_supported(dt, 64)
]
supported = bool(DTYPES)
needs_kernel = pytest.mark.skipif(
    not supported, reason="prefill_attention needs a C++ compiler and AVX512-BF16 or AVX2"
)
#: bf16: output rounded to 2^-8 and probabilities to bf16 before the value sum; float32:
#: summation order and the polynomial exp only
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 2e-5}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """float32 softmax attention; query row i sees keys 0 .. start + i."""
    t, h, d = q.shape
    s, hkv, _ = k.shape
    group = h // hkv
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) * d**-0.5
    visible = torch.arange(s).unsqueeze(0) <= (start + torch.arange(t)).unsqueeze(1)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), vf)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    assert module is not None
    out = torch.empty_like(q)
    module.prefill_attention(q, k, v, out, start, q.shape[-1] ** -0.5)
    return out


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 150),
    start=st.sampled_from([0, 0, 1, 17, 64, 130]),
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 3, 4]),
    head_dim=st.sampled_from([8, 16, 24, 32, 64, 80, 128, 256]),
    dtype=st.sampled_from(DTYPES or [torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_prefill_attention_matches_the_float32_reference(
    tokens: int,
    start: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    assert module is not None
    if not module.prefill_attention_supported(dtype, head_dim):
        assert dtype == torch.bfloat16 and head_dim % 16  # the bf16 kernel's pairs of 16
        return
    g = torch.Generator().manual_seed(seed)
    h = kv_heads * group
    q = (torch.randn(tokens, h, head_dim, generator=g) * 2).to(dtype)
    k = (torch.randn(start + tokens, kv_heads, head_dim, generator=g) * 2).to(dtype)
    v = torch.randn(start + tokens, kv_heads, head_dim, generator=g).to(dtype)
    out = run(q, k, v, start)
    ref = reference(q, k, v, start)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_reads_strided_rows_and_writes_into_a_view(dtype: torch.dtype) -> None:
    """q, k and v as column slices of one fused qkv projection, out a slice of a buffer."""
    g = torch.Generator().manual_seed(3)
    t, h, hkv, d = 70, 9, 3, 64
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
    buffer = torch.full((t + 5, h, d), float("nan"), dtype=dtype)
    assert module is not None
    module.prefill_attention(q, k, v, buffer[2 : t + 2], 0, d**-0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(buffer[2 : t + 2].float(), reference(q, k, v, 0), atol=tol, rtol=tol)
    assert buffer[:2].isnan().all() and buffer[t + 2 :].isnan().all()


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_matches_sdpa_on_the_embedded_models_shape(dtype: torch.dtype) -> None:
    """512 positions, 9 query heads over 3 KV heads of 64: what a prefill step runs."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(512, 9, 64, generator=g).to(dtype)
    k = torch.randn(512, 3, 64, generator=g).to(dtype)
    v = torch.randn(512, 3, 64, generator=g).to(dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0).float(),
        k.transpose(0, 1).unsqueeze(0).float(),
        v.transpose(0, 1).unsqueeze(0).float(),
        is_causal=True,
        enable_gqa=True,
    )[0].transpose(0, 1)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(run(q, k, v, 0).float(), sdpa, atol=tol, rtol=tol)


@needs_kernel
def test_prefill_attention_rejects_bad_inputs_with_a_message() -> None:
    assert module is not None
    dt = DTYPES[0]
    q = torch.zeros(4, 6, 64, dtype=dt)
    k = torch.zeros(6, 3, 64, dtype=dt)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match=r"start \(1\) \+ query rows \(4\) must equal"):
        module.prefill_attention(q, k, k, out, 1, 0.125)
    other = torch.float16
    name = {torch.float32: "Float", torch.bfloat16: "BFloat16"}[dt]
    with pytest.raises(RuntimeError, match=f"k must be {name} like q, got Half"):
        module.prefill_attention(q, k.to(other), k, out, 2, 0.125)
    with pytest.raises(RuntimeError, match="query heads 6 are not a multiple of KV heads 4"):
        k4 = torch.zeros(6, 4, 64, dtype=dt)
        module.prefill_attention(q, k4, k4, out, 2, 0.125)
    with pytest.raises(RuntimeError, match="no kernel for Half with head_dim 64"):
        module.prefill_attention(q.half(), k.half(), k.half(), out.half(), 2, 0.125)
    with pytest.raises(RuntimeError, match=r"no kernel for \w+ with head_dim 12"):
        q12 = torch.zeros(4, 6, 12, dtype=dt)
        k12 = torch.zeros(6, 3, 12, dtype=dt)
        module.prefill_attention(q12, k12, k12, torch.empty_like(q12), 2, 0.125)
    assert not module.prefill_attention_supported(torch.float16, 64)


def test_provider_offers_prefill_attention_only_where_it_runs() -> None:
    ops = FusedKernels().available_ops()
    assert ("prefill_attention" in ops) == supported
