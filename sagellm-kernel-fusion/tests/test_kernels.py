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
from sagellm.kernel_fusion.onednn import OneDNNLinear, onednn_available
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
)
def test_paged_decode_attention_matches_the_gathered_reference(
    batch: int,
    kv_heads: int,
    group: int,
    block_size: int,
    lens: list[int],
    seed: int,
    dtypes: tuple[torch.dtype, torch.dtype],
) -> None:
    qdt, cdt = dtypes
    g = torch.Generator().manual_seed(seed)
    d = 16
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
def test_paged_decode_attention_reads_only_the_table_blocks() -> None:
    # blocks outside the table hold NaN: a kernel that read them would return NaN
    k_cache = torch.full((6, 4, 1, 8), float("nan"))
    v_cache = torch.full((6, 4, 1, 8), float("nan"))
    k_cache[2] = 1.0
    v_cache[2] = torch.arange(8.0)
    k_cache[5, :1] = 1.0
    v_cache[5, :1] = 100.0
    tables = torch.tensor([[2, 5]], dtype=torch.int32)
    q = torch.ones(1, 1, 8)
    out = FusedKernels().get("paged_decode_attention")(
        q, k_cache, v_cache, tables, torch.tensor([5], dtype=torch.int32), 1.0
    )
    # five equal scores: the mean of four rows arange(8) and one row of 100
    want = (4 * torch.arange(8.0) + 100.0) / 5
    assert torch.allclose(out[0, 0], want, atol=1e-5)


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


def test_provider_implements_the_protocol_and_names_missing_ops() -> None:
    provider = FusedKernels()
    assert isinstance(provider, KernelProvider)
    with pytest.raises(KeyError, match="'rotary' is not provided here"):
        provider.get("rotary")
    off = FusedKernels(FusedKernelsConfig(onednn_linear=False, compiled_kernels=False))
    assert off.available_ops() == ()
    with pytest.raises(KeyError):
        off.get("dense_linear")
