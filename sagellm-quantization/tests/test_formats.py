"""GGUF block decoding, the GGUF -> CPU kernel mappings, round-to-nearest grids."""

from __future__ import annotations

import pytest
import torch
from blocks import q4_0_blocks, q4_1_blocks, q8_0_blocks, random_packed
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.core.testing.quantizer import make_linear
from sagellm.quantization.formats import (
    decode_blocks,
    int4_from_gguf,
    int4_levels,
    int4_rtn,
    int8_rtn,
    pack_int4,
    q8_0_values,
    unpack_int4,
)
from sagellm.quantization.methods import Int4Method, Int8Method

CODES = torch.tensor([list(range(16)) + list(range(15, -1, -1))])  # one block, 32 codes


def test_q4_1_decodes_a_hand_built_block() -> None:
    data = q4_1_blocks(torch.tensor([[0.25]]), torch.tensor([[-2.0]]), CODES)
    assert data.shape == (1, 20)
    assert data[0, :4].tolist() == [0x00, 0x34, 0x00, 0xC0]  # fp16 0.25, fp16 -2.0
    assert data[0, 4] == 0xF0  # weight 0 (code 0) low nibble, weight 16 (code 15) high
    got = decode_blocks("q4_1", data, (1, 32))
    assert got.tolist() == (0.25 * CODES.float() - 2.0).tolist()


def test_q4_0_decodes_a_hand_built_block() -> None:
    data = q4_0_blocks(torch.tensor([[0.5]]), CODES)
    assert data.shape == (1, 18)
    got = decode_blocks("q4_0", data, (1, 32))
    assert got.tolist() == (0.5 * (CODES.float() - 8)).tolist()


def test_q8_0_decodes_a_hand_built_block() -> None:
    q = torch.tensor([[-128, -127, -1, 0, 1, 2, 64, 127] * 4])
    data = q8_0_blocks(torch.tensor([[0.125]]), q)
    assert data.shape == (1, 34)
    assert decode_blocks("q8_0", data, (1, 32)).tolist() == (0.125 * q.float()).tolist()
    codes, d = q8_0_values(data, (1, 32))
    assert codes.dtype == torch.int8 and codes.tolist() == q.tolist() and d.tolist() == [[0.125]]


def test_two_blocks_and_rows_keep_their_order() -> None:
    d = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    m = torch.zeros(2, 2)
    q = torch.arange(64).remainder(16).repeat(2, 1)
    got = decode_blocks("q4_1", q4_1_blocks(d, m, q), (2, 64))
    want = q.float() * d.repeat_interleave(32, dim=1)
    assert torch.equal(got, want)


def test_q4_1_codes_map_onto_the_kernel_form_exactly() -> None:
    packed = random_packed("q4_1", 32, 128, seed=1)
    q, scale, zero = int4_from_gguf("q4_1", packed.data, packed.shape)
    assert torch.equal(
        unpack_int4(q, scale, zero), decode_blocks("q4_1", packed.data, packed.shape)
    )
    packed0 = random_packed("q4_0", 32, 128, seed=2)
    q0, s0, z0 = int4_from_gguf("q4_0", packed0.data, packed0.shape)
    assert torch.equal(z0, torch.zeros_like(z0))
    assert torch.equal(unpack_int4(q0, s0, z0), decode_blocks("q4_0", packed0.data, packed0.shape))


def _kernel_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # float32 accumulation: a few ulps of the sum of |x| |w| per output
    return 8 * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().t())


@pytest.mark.parametrize("fmt", ["q4_1", "q4_0"])
def test_q4_blocks_on_the_int4_kernel_match_the_decoded_weight(fmt: str) -> None:
    """The packed kernel's product equals x @ decoded.T to float32 rounding (M < 16 rows)."""
    packed = random_packed(fmt, 64, 256, seed=3)
    w = decode_blocks(fmt, packed.data, packed.shape)
    q, scale, zero = int4_from_gguf(fmt, packed.data, packed.shape)
    qweight, scale_zeros = pack_int4(q, scale, zero, torch.float32)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, 32, scale_zeros)
    ref = x.double() @ w.double().t()
    assert ((y.double() - ref).abs() <= _kernel_bound(x, w)).all()


def test_q4_1_through_the_method_in_bfloat16() -> None:
    """bf16 scales and activations: within bf16 rounding of the decoded weight's product."""
    packed = random_packed("q4_1", 64, 256, seed=4)
    w = decode_blocks("q4_1", packed.data, packed.shape)
    layer = make_linear(64, 256, weight=w, dtype="bfloat16", packed=packed)
    method = Int4Method(32, dense_min_rows=None, from_gguf=True)
    method.process_weights(layer)
    assert layer.weight is None and hasattr(layer, "qweight")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = method.apply(layer, x).float()
    ref = x.float() @ w.t()
    assert float((y - ref).norm() / ref.norm()) < 1e-2


def test_q8_0_blocks_with_group_32_are_used_exactly() -> None:
    packed = random_packed("q8_0", 48, 128, seed=5)
    w = decode_blocks("q8_0", packed.data, packed.shape)
    layer = make_linear(48, 128, weight=w, packed=packed)
    method = Int8Method(32, dense_min_rows=None, from_gguf=True)
    method.process_weights(layer)
    codes, d = q8_0_values(packed.data, packed.shape)
    # the kernel's own codes and scales, group by group
    assert torch.equal(layer.qweight.transpose(0, 1).reshape(48, 128), codes)
    assert torch.equal(layer.scales.t(), d)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(2))  # one row: the kernel
    y = method.apply(layer, x)
    ref = x.double() @ w.double().t()
    assert ((y.double() - ref).abs() <= _kernel_bound(x, w)).all()
    x4 = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(method.apply(layer, x4).double(), x4.double() @ w.double().t(), atol=1e-5)


def test_q8_0_per_row_rerounding_error_is_small() -> None:
    """One scale per row re-rounds the Q8_0 values: measured below 1% of the weight."""
    packed = random_packed("q8_0", 64, 256, seed=6)
    w = decode_blocks("q8_0", packed.data, packed.shape)
    layer = make_linear(64, 256, weight=w, packed=packed)
    method = Int8Method(None, dense_min_rows=None, from_gguf=True)
    method.process_weights(layer)
    assert layer.qweight.shape == (1, 64, 256)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4))
    y = method.apply(layer, x)
    ref = x @ w.t()
    assert float((y - ref).norm() / ref.norm()) < 0.01


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([32, 64, 128]),
    bits=st.sampled_from([2, 3, 4]),
    symmetric=st.booleans(),
    spread=st.floats(1e-3, 1e3),
    offset=st.floats(-2.0, 2.0),
)
def test_round_to_nearest_is_within_half_a_step(
    seed: int,
    rows: int,
    groups: int,
    group_size: int,
    bits: int,
    symmetric: bool,
    spread: float,
    offset: float,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * group_size, generator=gen) * spread + offset * spread
    q, scale, zero = int4_rtn(w, group_size, bits=bits, symmetric=symmetric)
    lo, hi = int4_levels(bits, symmetric)
    assert q.dtype == torch.int32 and int(q.min()) >= lo and int(q.max()) <= hi
    assert scale.shape == zero.shape == (rows, groups)
    if symmetric:
        assert torch.equal(zero, torch.zeros_like(zero))
    err = (unpack_int4(q, scale, zero) - w).abs().reshape(rows, groups, group_size)
    step = scale.unsqueeze(-1)
    slack = 1e-5 * w.abs().reshape(rows, groups, group_size).amax(-1, keepdim=True)
    assert (err <= step / 2 + slack).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 8), spread=st.floats(1e-3, 1e3))
def test_int8_round_to_nearest_is_within_half_a_step(seed: int, rows: int, spread: float) -> None:
    w = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)) * spread
    q, scale = int8_rtn(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (q.float() * scale.unsqueeze(1) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 * (1 + 1e-5)).all()


def test_levels_and_bad_bits() -> None:
    assert int4_levels(4, False) == (0, 15)
    assert int4_levels(4, True) == (0, 15)
    assert int4_levels(3, False) == (0, 7)
    assert int4_levels(3, True) == (4, 11)
    with pytest.raises(ValueError, match="2, 3 or 4-bit"):
        int4_levels(5, False)


def test_block_errors_say_what_fits() -> None:
    data = torch.zeros(2, 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not supported"):
        decode_blocks("q5_k", data, (2, 32))
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        decode_blocks("q4_1", data, (2, 40))
    with pytest.raises(ValueError, match=r"uint8 \[2, 40\]"):
        decode_blocks("q4_1", data, (2, 64))
    with pytest.raises(ValueError, match="only q4_0 and q4_1"):
        int4_from_gguf("q8_0", torch.zeros(2, 34, dtype=torch.uint8), (2, 32))
    with pytest.raises(ValueError, match="does not divide"):
        int4_rtn(torch.zeros(2, 48), 32)
