"""Masks: exact counts, the n:m rule, ties by position (hypothesis properties)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.sparsity.config import parse_pattern
from sagellm.sparsity.masks import (
    is_nm_sparse,
    nm_mask,
    num_pruned,
    row_mask,
    sparsity_of,
    tensor_mask,
)

_SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def score_matrices(draw: st.DrawFn, col_multiple: int = 1) -> torch.Tensor:
    rows = draw(st.integers(1, 6))
    cols = col_multiple * draw(st.integers(1, 6))
    # few distinct values, so ties are common
    values = draw(st.lists(st.integers(0, 4), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)


@_SETTINGS
@given(score_matrices(), st.floats(0.0, 0.95))
def test_row_mask_prunes_the_lowest_of_each_row(scores: torch.Tensor, sparsity: float) -> None:
    mask = row_mask(scores, sparsity)
    k = num_pruned(scores.shape[1], sparsity)
    assert mask.sum(dim=1).tolist() == [k] * scores.shape[0]
    for r in range(scores.shape[0]):
        pruned, kept = scores[r][mask[r]], scores[r][~mask[r]]
        if pruned.numel() and kept.numel():
            assert float(pruned.max()) <= float(kept.min())
        # ties go by position: a pruned score never has a kept equal score before it
        for c in torch.nonzero(mask[r]).flatten().tolist():
            earlier = (~mask[r][:c]) & (scores[r][:c] == scores[r][c])
            assert not bool(earlier.any())


@_SETTINGS
@given(score_matrices(), st.floats(0.0, 0.95))
def test_tensor_mask_prunes_the_lowest_overall(scores: torch.Tensor, sparsity: float) -> None:
    mask = tensor_mask(scores, sparsity)
    assert int(mask.sum()) == num_pruned(scores.numel(), sparsity)
    pruned, kept = scores[mask], scores[~mask]
    if pruned.numel() and kept.numel():
        assert float(pruned.max()) <= float(kept.min())


@_SETTINGS
@given(st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]), st.data())
def test_nm_mask_keeps_n_of_every_m(nm: tuple[int, int], data: st.DataObject) -> None:
    n, m = nm
    scores = data.draw(score_matrices(col_multiple=m))
    mask = nm_mask(scores, n, m)
    rows, cols = scores.shape
    groups = mask.reshape(rows, cols // m, m)
    assert (groups.sum(dim=-1) == m - n).all()
    kept = torch.where(mask, torch.zeros_like(scores), scores + 1.0)  # +1: a 0 score is kept
    assert is_nm_sparse(kept, n, m)
    g_scores = scores.reshape(rows, cols // m, m)
    lo = torch.where(groups, g_scores, torch.full_like(g_scores, -1.0)).amax(dim=-1)
    hi = torch.where(~groups, g_scores, torch.full_like(g_scores, 99.0)).amin(dim=-1)
    assert (lo <= hi).all()


def test_exact_masks() -> None:
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 9.0, 9.0, 0.1]])
    assert row_mask(s, 0.5).tolist() == [[False, True, False, True, True, False, False, True]]
    assert nm_mask(s, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]
    # the tie of 9.0 and 9.0: the earlier column goes
    assert nm_mask(s, 1, 4).tolist() == [[False, True, True, True, True, True, False, True]]
    ties = torch.ones(1, 4)
    assert nm_mask(ties, 2, 4).tolist() == [[True, True, False, False]]
    assert sparsity_of(torch.tensor([0.0, 1.0, 0.0, 2.0])) == 0.5
    assert is_nm_sparse(torch.tensor([[0.0, 1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]]), 2, 4) is False


def test_bad_shapes_and_patterns_say_what_to_do() -> None:
    with pytest.raises(ValueError) as info:
        nm_mask(torch.ones(2, 6), 2, 4)
    assert str(info.value) == (
        "an n:m pattern 2:4 groups each row's columns by 4, but the layer has 6 input "
        "columns; use a projection whose input size is a multiple of 4, or the "
        "unstructured pattern"
    )
    with pytest.raises(ValueError, match=r"sparsity 1.0 is outside \[0, 1\)"):
        row_mask(torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError) as info:
        parse_pattern("2-4")
    assert str(info.value) == (
        "pattern '2-4' is neither 'unstructured' nor 'N:M' (N non-zeros in every M "
        "consecutive weights of a row, e.g. '2:4' or '4:8')"
    )
    with pytest.raises(ValueError, match=r"N:M needs 0 < N < M"):
        parse_pattern("4:4")
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern("unstructured") is None
