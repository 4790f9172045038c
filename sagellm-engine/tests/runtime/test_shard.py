"""Slicing a GGUF checkpoint's blocks for tensor parallelism, against slicing the
decoded weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.core.types import PackedWeight
from sagellm.engine.models.gguf_file import dequantize
from sagellm.engine.models.shard import slice_packed

FORMATS = ("q4_0", "q4_1", "q8_0")


def _packed(fmt: str, rows: int, cols: int, seed: int) -> PackedWeight:
    import gguf

    qt = gguf.GGMLQuantizationType[fmt.upper()]
    data = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf.quants.quantize(data, qt).reshape(rows, -1).view(np.uint8).copy()
    return PackedWeight(fmt, torch.from_numpy(raw), (rows, cols))


def _decoded(p: PackedWeight) -> torch.Tensor:
    import gguf

    qt = gguf.GGMLQuantizationType[p.format.upper()]
    return dequantize(p.data.reshape(-1), qt, p.shape)


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    rows=st.integers(1, 9),
    blocks=st.integers(1, 5),
    data=st.data(),
)
def test_sliced_blocks_decode_to_the_sliced_weight(
    fmt: str, rows: int, blocks: int, data: st.DataObject
) -> None:
    p = _packed(fmt, rows, blocks * 32, seed=rows * 7 + blocks)
    full = _decoded(p)
    ranges = data.draw(
        st.lists(st.tuples(st.integers(0, rows), st.integers(0, rows)), min_size=1, max_size=3)
    )
    ranges = [(min(a, b), max(a, b)) for a, b in ranges]
    b0 = data.draw(st.integers(0, blocks - 1))
    b1 = data.draw(st.integers(b0 + 1, blocks))
    pad = data.draw(st.integers(0, 3))
    out = slice_packed(p, rows=ranges, cols=(32 * b0, 32 * b1), pad_rows=pad)
    assert out is not None and out.format == fmt
    want = torch.cat([full[a:b] for a, b in ranges])[:, 32 * b0 : 32 * b1]
    want = torch.cat([want, torch.zeros(pad, want.shape[1])])
    assert out.shape == tuple(want.shape)
    assert torch.equal(_decoded(out), want)
    assert out.data.data_ptr() != p.data.data_ptr()  # a copy: the full blocks can go


def test_columns_that_cut_a_block_give_none() -> None:
    p = _packed("q4_1", 4, 96, seed=0)
    assert slice_packed(p, cols=(0, 48)) is None
    assert slice_packed(p, cols=(16, 64)) is None
    assert slice_packed(None, rows=[(0, 2)]) is None
    whole = slice_packed(p, cols=(0, 96))
    assert whole is not None and torch.equal(whole.data, p.data)


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_formats_of_other_blocks_are_not_cut_by_columns(fmt: str) -> None:
    p = PackedWeight(fmt, torch.zeros(2, 4 * 144, dtype=torch.uint8), (2, 1024))
    assert slice_packed(p, cols=(0, 512)) is None
    rows = slice_packed(p, rows=[(1, 2)])  # rows are independent in every format
    assert rows is not None and rows.shape == (1, 1024)
