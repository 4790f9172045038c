"""Quantized KV caches: the row format, attention over it, and the runtime's schema."""

from __future__ import annotations

import pytest
import torch

from sagellm.core.errors import CapabilityMismatchError, ConfigError
from sagellm.core.types import KVCacheSchema
from sagellm.engine.layers.attention import Attention
from sagellm.engine.layers.kv_quant import QMAX, dequantize_rows, quantize_rows
from sagellm.engine.runtime.batch import build_step_batch

from .conftest import bind_pool
from .helpers import chunk, make_plan, random_tokens, reference_logits

QUANTIZED = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]
#: Mantissa bits and the smallest subnormal exponent of each float8 type.
FP8_FORMAT = {torch.float8_e4m3fn: (3, -9), torch.float8_e5m2: (2, -16)}


def sample_rows(seed: int) -> torch.Tensor:
    """Rows of very different ranges: normal, outliers, tiny, zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, 64, generator=g)
    x[8:16] *= 50.0
    x[16:24, :, 5] = 400.0  # one outlier per row
    x[24:32] *= 1e-3
    x[32:34] = 0.0
    return x


# ---------------------------------------------------------------- row format


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_rows_hold_values_then_the_float16_scale(dtype: torch.dtype) -> None:
    x = torch.tensor([[[1.0, -2.0, 0.5, 0.0]]])
    rows = quantize_rows(x, dtype)
    assert rows.dtype == dtype and rows.shape == (1, 1, 6)
    scale = rows[..., 4:].view(torch.float16)
    # amax / qmax, at least float16's smallest normal (e5m2: 2 / 57344 is below it)
    want = max(2.0 / QMAX[dtype], torch.finfo(torch.float16).tiny)
    assert scale.item() == pytest.approx(want, rel=1e-3)
    if dtype is torch.int8:
        # round(x / scale): -2 maps onto -127
        s = float(scale)
        assert rows[0, 0, :4].tolist() == [round(1 / s), -127, round(0.5 / s), 0]
    # the largest value comes back to the precision of the float16 scale
    assert float(dequantize_rows(rows, 4, torch.float32)[0, 0, 1]) == pytest.approx(-2, rel=2**-11)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_round_trip_is_within_half_a_step_of_each_rows_scale(seed: int) -> None:
    x = sample_rows(seed)
    rows = quantize_rows(x, torch.int8)
    scale = rows[..., 64:].view(torch.float16).float()
    err = (dequantize_rows(rows, 64, torch.float32) - x).abs()
    assert torch.all(err <= scale * (0.5 + 1e-4))
    assert torch.all(err[32:34] == 0)  # a zero row comes back exactly
    rel = err[:8].norm() / x[:8].norm()
    print(f"int8 relative error (gaussian rows): {float(rel):.4f}")
    assert rel < 0.01


@pytest.mark.parametrize("dtype", list(FP8_FORMAT))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_round_trip_is_within_its_mantissa(dtype: torch.dtype, seed: int) -> None:
    x = sample_rows(seed)
    rows = quantize_rows(x, dtype)
    scale = rows[..., 64:].view(torch.float16).float()
    err = (dequantize_rows(rows, 64, torch.float32) - x).abs()
    bits, min_exp = FP8_FORMAT[dtype]
    # round to nearest: half a unit in the last place, relative for normal values and
    # half the smallest subnormal (in units of the row's scale) near zero
    bound = torch.maximum(x.abs() * 2.0 ** -(bits + 1), scale * 2.0 ** (min_exp - 1))
    assert torch.all(err <= bound * (1 + 1e-3))
    assert torch.all(err[32:34] == 0)
    rel = err[:8].norm() / x[:8].norm()
    print(f"{dtype} relative error (gaussian rows): {float(rel):.4f}")
    assert rel < 2.0 ** -(bits + 1)


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_bfloat16_rows_round_trip_into_bfloat16(dtype: torch.dtype) -> None:
    x = sample_rows(3).to(torch.bfloat16)
    back = dequantize_rows(quantize_rows(x, dtype), 64, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    ref = dequantize_rows(quantize_rows(x, dtype), 64, torch.float32)
    assert torch.allclose(back.float(), ref, rtol=2**-7, atol=0)


# ---------------------------------------------------------------- attention


def _attention_pair(dtype: torch.dtype, kernel: bool):
    """Attention over a quantized cache and over a float32 cache of the same content."""
    attn = Attention(num_heads=6, num_kv_heads=2, head_dim=16)
    if kernel:
        from sagellm.core import registry

        if not any(p.name == "fused" for p in registry.available("kernels")):
            pytest.skip("sagellm-kernel-fusion is not installed (pip install 'sagellm[accel]')")
        provider = registry.load("kernels", "fused", {})
        if "paged_decode_attention" not in provider.available_ops():
            pytest.skip("no C++ compiler: the paged decode kernel is unavailable")
        attn.decode_kernel = provider.get("paged_decode_attention")
    qcache = [torch.zeros(12, 4, 2, 18, dtype=dtype) for _ in range(2)]
    fcache = [torch.zeros(12, 4, 2, 16) for _ in range(2)]
    return attn, qcache, fcache


def _step(attn, caches, chunks, paged: bool, q, k, v):
    batch = build_step_batch(
        chunks,
        block_size=4,
        num_blocks=12,
        max_model_len=48,
        mask_dtype=torch.float32,
        device=torch.device("cpu"),
        paged_decode=paged,
    )
    return attn(q, k, v, caches[0], caches[1], batch.meta)


@pytest.mark.parametrize(
    ("dtype", "kernel"),
    [
        (torch.int8, False),
        (torch.int8, True),
        (torch.float8_e4m3fn, False),
        (torch.float8_e5m2, False),
    ],
    ids=["int8-gather", "int8-kernel", "e4m3-gather", "e5m2-gather"],
)
def test_attention_over_a_quantized_cache_equals_attention_over_its_dequantized_values(
    dtype: torch.dtype, kernel: bool
) -> None:
    """Prefill, a chunk after a cached prefix and decodes: the quantized cache gives what a
    float cache holding the dequantized keys and values gives."""
    attn, qcache, fcache = _attention_pair(dtype, kernel)
    g = torch.Generator().manual_seed(0)
    tables = {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}

    def qkv(n: int):
        return (
            torch.randn(n, 6, 16, generator=g),
            torch.randn(n, 2, 16, generator=g) * 3,
            torch.randn(n, 2, 16, generator=g),
        )

    def fake_quant(t: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(quantize_rows(t, dtype), 16, torch.float32)

    steps = [
        ([chunk("a", [1] * 9, 0, tables["a"])], 9),  # prefill, no prefix
        ([chunk("a", [1] * 5, 9, tables["a"]), chunk("b", [1] * 6, 0, tables["b"])], 11),
        ([chunk("a", [1], 14, tables["a"]), chunk("b", [1], 6, tables["b"])], 2),  # decodes
        ([chunk("a", [1], 15, tables["a"]), chunk("b", [1] * 3, 7, tables["b"])], 4),
    ]
    for chunks, n in steps:
        q, k, v = qkv(n)
        got = _step(attn, qcache, chunks, kernel, q, k, v)
        want = _step(attn, fcache, chunks, False, q, fake_quant(k), fake_quant(v))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the cache holds exactly the quantized rows (scales included) of what was written
    written = fcache[0].view(-1, 2, 16)[:16]
    assert torch.equal(dequantize_rows(qcache[0].view(-1, 2, 18)[:16], 16, torch.float32), written)


# ---------------------------------------------------------------- runtime


def test_runtime_schema_per_kv_cache_dtype(tiny_dir, tiny_rt) -> None:
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    dims = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "block_size": 4}
    assert tiny_rt.kv_cache_schema(4) == KVCacheSchema(**dims, dtype="float32")
    for choice, name in (
        ("int8", "int8"),
        ("fp8_e4m3", "float8_e4m3fn"),
        ("fp8_e5m2", "float8_e5m2"),
        ("float8_e5m2", "float8_e5m2"),
    ):
        schema = tiny_rt.kv_cache_schema(4, choice)
        assert schema == KVCacheSchema(**dims, dtype=name, scale_bytes=2)
        assert schema.bytes_per_token == 2 * 2 * 2 * 18  # 36 bytes per token-head
    assert tiny_rt.kv_cache_schema(4, "auto").dtype == "float32"
    with pytest.raises(ConfigError, match="KV cache dtype 'uint8' is not supported"):
        tiny_rt.kv_cache_schema(4, "uint8")
    caps = tiny_rt.capabilities()
    assert caps.kv_dtypes == (
        "bfloat16",
        "float16",
        "float32",
        "float8_e4m3fn",
        "float8_e5m2",
        "int8",
    )
    rt = NativeRuntime(
        NativeRuntimeConfig(model=str(tiny_dir), dtype="float32", kv_cache_dtype="fp8_e4m3")
    )
    assert rt.kv_cache_schema(8) == KVCacheSchema(
        **{**dims, "block_size": 8}, dtype="float8_e4m3fn", scale_bytes=2
    )


def test_binding_checks_the_scale_bytes_and_picks_the_decode_path(tiny_rt) -> None:
    from sagellm.kv_pool.config import PagedKVPoolConfig
    from sagellm.kv_pool.paged import PagedKVPool

    dims = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "block_size": 4}
    for schema in (
        KVCacheSchema(**dims, dtype="int8"),  # no room for the scales
        KVCacheSchema(**dims, dtype="float32", scale_bytes=4),
    ):
        pool = PagedKVPool(PagedKVPoolConfig(num_blocks=4), schema=schema)
        with pytest.raises(CapabilityMismatchError, match="scale_bytes"):
            tiny_rt.bind_kv_pool(pool)
    kernel = tiny_rt._has_decode_kernel
    for dtype, paged in (("int8", kernel), ("fp8_e4m3", False), ("fp8_e5m2", False)):
        bind_pool(tiny_rt, dtype=dtype)
        # the paged decode kernel reads int8 rows with their scales; float8 gathers
        assert tiny_rt._paged_decode is paged, dtype
    bind_pool(tiny_rt)
    assert tiny_rt._paged_decode is kernel


@pytest.fixture(scope="module")
def eager_rt(tiny_dir):
    """The tiny model without a kernel provider: quantizing writes and gathers in torch."""
    from sagellm.engine.runtime.config import NativeRuntimeConfig
    from sagellm.engine.runtime.native import NativeRuntime

    config = NativeRuntimeConfig(model=str(tiny_dir), dtype="float32", kernels="eager")
    return NativeRuntime(config)


@pytest.mark.parametrize("kernels", ["default", "eager"])
@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_quantized_cache_follows_the_reference_and_ignores_chunking(
    tiny_dir, tiny_rt, eager_rt, dtype, kernels
) -> None:
    # default: the fused provider where installed (rotary + quantized KV write, and the
    # paged decode kernel for int8)
    tiny_rt = tiny_rt if kernels == "default" else eager_rt
    tokens = random_tokens(30, 320, seed=11)
    ref = reference_logits(tiny_dir, tokens)
    logits = []
    for sizes in ([30], [7, 16, 1, 6], [1] * 30):
        pool = bind_pool(tiny_rt, dtype=dtype)
        blocks = pool.allocate(8)
        start, rows = 0, []
        for n in sizes:
            plan = make_plan([chunk("r", tokens[start : start + n], start, blocks)])
            rows.append(tiny_rt.execute(plan).logits[0])
            start += n
        logits.append(rows[-1])
    # the same quantized keys and values whichever way the prompt was split
    for other in logits[1:]:
        assert (other - logits[0]).abs().max() < 1e-4
    scale = ref[-1].abs().max()
    tolerance = {"int8": 0.02, "fp8_e4m3": 0.05, "fp8_e5m2": 0.1}[dtype]
    assert (logits[0] - ref[-1]).abs().max() < tolerance * scale
    bind_pool(tiny_rt)
