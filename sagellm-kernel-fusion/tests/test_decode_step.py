"""The fused decode step against the same ops called one by one, as the engine's layers do."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gguf_linear import make_blocks
from torch import nn

from sagellm.kernel_fusion.decode import FusedDecodeStep, make_decode_step
from sagellm.kernel_fusion.extension import load_kernels
from sagellm.kernel_fusion.gguf import GGUFBlockLinear
from sagellm.kernel_fusion.provider import FusedKernels

needs_compiler = pytest.mark.skipif(load_kernels() is None, reason="no C++ compiler here")

E, H, HKV, D, INTER = 64, 4, 2, 16, 96
EPS = 1e-5
BLOCK = 4  # tokens per KV block
NUM_BLOCKS = 24


class _Proj(nn.Module):
    """A projection as the engine's Linear holds one: blocks, an optional bias, a method."""

    def __init__(
        self, fmt: str, n: int, k: int, seed: int, input_bits: int, bias: torch.dtype | None
    ) -> None:
        super().__init__()
        self.packed, _ = make_blocks(fmt, n, k, seed)
        g = torch.Generator().manual_seed(seed + 1)
        # the bias in the activation dtype, as the engine's projections keep it
        self.bias = (torch.randn(n, generator=g) * 0.1).to(bias) if bias else None
        self.method: Any = GGUFBlockLinear(input_bits)
        self.method.process_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.method.apply(self, x)
        return y


class _Wrapper:
    """A quantizer's method that hands its steps below ``dense_min_rows`` to its blocks."""

    name = "int4+gguf_blocks"

    def __init__(self, blocks: GGUFBlockLinear, dense_min_rows: int | None) -> None:
        self.blocks = blocks
        self.dense_min_rows = dense_min_rows


def _layers(n: int, input_bits: int, dtype: torch.dtype, seed: int) -> list[dict[str, Any]]:
    formats = ["q4_1", "q4_0", "q8_0"]
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        fmt = formats[i % 3]
        s = seed * 100 + i * 10
        specs.append(
            {
                "input_norm": (1 + 0.1 * torch.randn(E, generator=g)).to(dtype),
                "post_norm": (1 + 0.1 * torch.randn(E, generator=g)).to(dtype),
                "num_heads": H,
                "qkv": _Proj(fmt, (H + 2 * HKV) * D, E, s, input_bits, dtype if i == 0 else None),
                "o": _Proj(fmt, E, H * D, s + 1, input_bits, None),
                "gate_up": _Proj(fmt, 2 * INTER, E, s + 2, input_bits, None),
                "down": _Proj("q8_0", E, INTER, s + 3, input_bits, None),
            }
        )
    return specs


def _reference(
    specs: list[dict[str, Any]],
    hidden: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    tables: torch.Tensor,
    lens: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops one at a time, in the engine layer's order."""
    ops = load_kernels()
    t = hidden.shape[0]
    h, r = hidden, hidden
    for i, (spec, (kc, vc)) in enumerate(zip(specs, caches)):
        if i == 0:
            x = ops.rms_norm(h, spec["input_norm"], EPS)
        else:
            x, r = ops.add_rms_norm(h, r, spec["input_norm"], EPS)
        qkv = spec["qkv"](x)
        ops.rotary_write_kv(qkv, positions, cos, sin, H, HKV, kc, vc, slots)
        q = qkv[:, : H * D].reshape(t, H, D).contiguous()
        attn = ops.paged_decode_attention(q, kc, vc, tables, lens, D**-0.5)
        h = spec["o"](attn.view(t, H * D))
        x, r = ops.add_rms_norm(h, r, spec["post_norm"], EPS)
        h = spec["down"](ops.silu_and_mul(spec["gate_up"](x)))
    return h, r


def _caches(
    n: int, dtype: torch.dtype, kv: str, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    if kv == "int8":
        # D int8 values per row, then the row's float16 scale in its two bytes
        out = []
        for _ in range(n):
            pair = []
            for _ in range(2):
                rows = torch.randint(-100, 100, (NUM_BLOCKS, BLOCK, HKV, D + 2), generator=g)
                cache = rows.to(torch.int8)
                scale = (torch.rand(NUM_BLOCKS, BLOCK, HKV, 1, generator=g) * 0.02 + 0.001).half()
                cache[..., D:] = scale.view(torch.int8)
                pair.append(cache)
            out.append((pair[0], pair[1]))
        return out
    shape = (NUM_BLOCKS, BLOCK, HKV, D)
    return [
        tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(2))  # type: ignore[misc]
        for _ in range(n)
    ]


@needs_compiler
@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(1, 5 * BLOCK), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    input_bits=st.sampled_from([8, 16]),
    kv=st.sampled_from(["float", "int8"]),
    seed=st.integers(0, 1000),
)
def test_decode_step_is_bitwise_the_ops_one_by_one(
    lens: list[int], dtype: torch.dtype, input_bits: int, kv: str, seed: int
) -> None:
    """Hidden state, residual and every cache byte equal the layer-by-layer result."""
    num_layers = 3
    specs = _layers(num_layers, input_bits, dtype, seed)
    step = make_decode_step(specs, num_kv_heads=HKV, head_dim=D, eps=EPS)
    assert isinstance(step, FusedDecodeStep) and step.num_layers == num_layers
    t = len(lens)
    g = torch.Generator().manual_seed(seed)
    # sequence b owns blocks 5b .. 5b+4 (in a shuffled order); its new token sits at the
    # last of its positions
    perm = torch.randperm(NUM_BLOCKS, generator=g)[: 5 * t].view(t, 5).to(torch.int32)
    context = torch.tensor(lens, dtype=torch.int32)
    positions = context.long() - 1
    slots = torch.stack(
        [perm[b, int(p) // BLOCK].long() * BLOCK + int(p) % BLOCK for b, p in enumerate(positions)]
    )
    hidden = torch.randn(t, E, generator=g).to(dtype)
    angles = torch.arange(64).float()[:, None] * (0.1 ** torch.arange(D // 2).float())
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    ours, theirs = _caches(num_layers, dtype, kv, seed), _caches(num_layers, dtype, kv, seed)
    h, r = step(hidden.clone(), positions, slots, ours, perm, context, cos, sin)
    want_h, want_r = _reference(
        specs, hidden.clone(), positions, slots, theirs, perm, context, cos, sin
    )
    assert h.dtype == dtype and h.shape == (t, E)
    assert torch.equal(h, want_h) and torch.equal(r, want_r)
    for (k1, v1), (k2, v2) in zip(ours, theirs):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


class _DenseFrom:
    """A quantizer's method as ``_WeightOnlyMethod`` behaves: its blocks below
    ``dense_min_rows`` rows, the layer's float product (``layer.dense``, else
    ``F.linear`` on ``layer.weight``) from there."""

    name = "int4+gguf_blocks"

    def __init__(self, blocks: GGUFBlockLinear, dense_min_rows: int) -> None:
        self.blocks = blocks
        self.dense_min_rows = dense_min_rows

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.dense_min_rows:
            dense = getattr(layer, "dense", None)
            if dense is not None:
                y: torch.Tensor = dense.apply(layer, x)
                return y
            return torch.nn.functional.linear(x, layer.weight, layer.bias)
        return self.blocks.apply(layer, x)


def _with_dense(
    specs: list[dict[str, Any]],
    rows: int,
    dtype: torch.dtype,
    seed: int,
    kinds: tuple[str, ...] = ("onednn", "linear"),
) -> None:
    """Give every projection another product from ``rows`` rows on, layer ``i`` the kind
    ``kinds[i % len(kinds)]``: oneDNN's blocked float weight, a plain ``F.linear`` weight,
    or the W8A8 int8 product."""
    from sagellm.kernel_fusion.onednn import OneDNNInt8Linear, OneDNNLinear

    g = torch.Generator().manual_seed(seed)
    for i, spec in enumerate(specs):
        kind = kinds[i % len(kinds)]
        for name in ("qkv", "o", "gate_up", "down"):
            proj = spec[name]
            n, k = proj.block_scales.shape[0], proj.block_scales.shape[1] * 32
            proj.weight = nn.Parameter((torch.randn(n, k, generator=g) * 0.05).to(dtype))
            if kind != "linear":
                proj.dense = OneDNNLinear() if kind == "onednn" else OneDNNInt8Linear()
                proj.dense.process_weights(proj)
            proj.method = _DenseFrom(proj.method, rows)


@needs_compiler
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 7),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 1000),
    int8=st.booleans(),
)
def test_decode_step_switches_to_the_float_product_where_the_layer_does(
    rows: int, dtype: torch.dtype, seed: int, int8: bool
) -> None:
    """From ``dense_min_rows`` on the step multiplies by the layers' other product (oneDNN
    blocked, plain, or W8A8 int8), bitwise as the layers do, and so covers every row
    count."""
    from sagellm.kernel_fusion.onednn import int8_linear_available, onednn_available

    if not onednn_available(dtype):
        pytest.skip(f"oneDNN linear does not run in {dtype} here")
    if int8 and not int8_linear_available():
        pytest.skip("oneDNN's int8 product does not run here")
    num_layers = 3 if int8 else 2
    specs = _layers(num_layers, 16, dtype, seed)
    kinds = ("onednn", "linear", "int8") if int8 else ("onednn", "linear")
    _with_dense(specs, 4, dtype, seed, kinds)
    step = make_decode_step(specs, num_kv_heads=HKV, head_dim=D, eps=EPS)
    assert step is not None and step.max_rows > 10**9
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=g)[:rows].view(rows, 1).to(torch.int32)
    context = torch.randint(1, BLOCK + 1, (rows,), generator=g, dtype=torch.int32)
    positions = context.long() - 1
    slots = perm[:, 0].long() * BLOCK + positions
    hidden = torch.randn(rows, E, generator=g).to(dtype)
    angles = torch.arange(64).float()[:, None] * (0.1 ** torch.arange(D // 2).float())
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    ours, theirs = (
        _caches(num_layers, dtype, "float", seed),
        _caches(num_layers, dtype, "float", seed),
    )
    h, r = step(hidden.clone(), positions, slots, ours, perm, context, cos, sin)
    want_h, want_r = _reference(
        specs, hidden.clone(), positions, slots, theirs, perm, context, cos, sin
    )
    assert torch.equal(h, want_h) and torch.equal(r, want_r)
    for (k1, v1), (k2, v2) in zip(ours, theirs):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    if rows >= 4:  # the float product really ran: the blocks alone give other numbers
        for spec in specs:
            for name in ("qkv", "o", "gate_up", "down"):
                spec[name].method.dense_min_rows = 10**9
        blocks_h, _ = _reference(
            specs, hidden.clone(), positions, slots, theirs, perm, context, cos, sin
        )
        assert not torch.equal(blocks_h, want_h)


@needs_compiler
def test_decode_step_takes_a_quantizers_few_row_method_and_its_row_limit() -> None:
    specs = _layers(2, 16, torch.float32, 3)
    for spec in specs:
        for name in ("qkv", "o", "gate_up", "down"):
            spec[name].method = _Wrapper(spec[name].method, 16)
    # the float weights are gone: the blocks compute at every row count
    step = make_decode_step(specs, num_kv_heads=HKV, head_dim=D, eps=EPS)
    assert step is not None and step.max_rows > 10**9

    class OtherFloat:
        name = "some_float_kernel"

    # a float method the step does not run: the step stops where the layer leaves its blocks
    specs[1]["down"].method.dense_min_rows = 12
    specs[1]["down"].weight = nn.Parameter(torch.zeros(E, INTER))
    specs[1]["down"].dense = OtherFloat()
    step = make_decode_step(specs, num_kv_heads=HKV, head_dim=D, eps=EPS)
    assert step is not None and step.max_rows == 12
    hidden = torch.zeros(12, E)
    with pytest.raises(ValueError, match="a step of 12 rows is not a fused decode step"):
        step(hidden, hidden, hidden, [], hidden, hidden, hidden, hidden)


@needs_compiler
def test_decode_step_declines_projections_off_the_blocks(caplog: pytest.LogCaptureFixture) -> None:
    specs = _layers(2, 16, torch.float32, 4)

    class Dense:
        name = "dense"

    specs[1]["o"].method = Dense()
    with caplog.at_level(logging.INFO, logger="sagellm.kernel_fusion.decode"):
        assert make_decode_step(specs, num_kv_heads=HKV, head_dim=D, eps=EPS) is None
    assert "layers.1.o: its method 'dense' does not compute on GGUF blocks" in caplog.text
    mixed = _layers(2, 16, torch.float32, 5)
    mixed[1]["qkv"].method.input_bits = 8
    assert make_decode_step(mixed, num_kv_heads=HKV, head_dim=D, eps=EPS) is None


@needs_compiler
def test_decode_step_rejects_shapes_that_do_not_fit_with_a_message() -> None:
    specs = _layers(1, 16, torch.float32, 6)
    specs[0]["o"], specs[0]["gate_up"] = specs[0]["gate_up"], specs[0]["o"]
    with pytest.raises(RuntimeError, match=r"layer 0: o is 192x64, expected 64x64"):
        make_decode_step(specs, num_kv_heads=HKV, head_dim=D, eps=EPS)
    step = make_decode_step(_layers(2, 16, torch.float32, 7), num_kv_heads=HKV, head_dim=D, eps=EPS)
    assert step is not None
    caches = _caches(1, torch.float32, "float", 0)
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"one K and one V cache per layer \(2\) expected"):
        step(torch.zeros(1, E), one, one, caches, one.int().view(1, 1), one.int() + 1, one, one)
    with pytest.raises(RuntimeError, match="hidden must be contiguous"):
        step(torch.zeros(1, E + 1), one, one, caches * 2, one.int().view(1, 1), one.int(), one, one)


def test_provider_offers_the_decode_step_with_the_block_kernel() -> None:
    from sagellm.kernel_fusion.config import FusedKernelsConfig

    if load_kernels() is None:
        assert "decode_step" not in FusedKernels().available_ops()
        return
    assert "decode_step" in FusedKernels().available_ops()
    assert FusedKernels().get("decode_step") is make_decode_step
    off = FusedKernels(FusedKernelsConfig(decode_step=False))
    assert "decode_step" not in off.available_ops()
    assert "decode_step" not in FusedKernels(FusedKernelsConfig(gguf_blocks=False)).available_ops()
