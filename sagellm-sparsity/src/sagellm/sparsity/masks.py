"""Masks: which weights of a ``[rows, columns]`` matrix a score removes.

A mask is a bool tensor of the weight's shape, True where the weight is removed. Ties
are broken by position (the earlier column goes first), so a mask depends only on the
scores. ``n:m`` patterns keep at most ``n`` non-zeros in each run of ``m`` consecutive
columns of a row (NVIDIA's 2:4 is ``n=2, m=4``).
"""

from __future__ import annotations

import torch

__all__ = [
    "check_nm_shape",
    "is_nm_sparse",
    "nm_mask",
    "num_pruned",
    "row_mask",
    "sparsity_of",
    "tensor_mask",
]


def num_pruned(count: int, sparsity: float) -> int:
    """Weights removed out of ``count`` at ``sparsity`` (rounded down)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    return int(count * sparsity)


def _lowest(scores: torch.Tensor, num: int) -> torch.Tensor:
    """Bool mask of the ``num`` lowest entries of each row of ``scores`` ``[R, C]``."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if num > 0:
        order = torch.argsort(scores, dim=-1, stable=True)[..., :num]
        mask.scatter_(-1, order, True)
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest ``sparsity`` of each row (Wanda's per-output comparison group)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [rows, columns], got {list(scores.shape)}")
    return _lowest(scores, num_pruned(scores.shape[1], sparsity))


def tensor_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest ``sparsity`` of the whole matrix (layer-wise magnitude pruning)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [rows, columns], got {list(scores.shape)}")
    flat = _lowest(scores.reshape(1, -1), num_pruned(scores.numel(), sparsity))
    return flat.reshape(scores.shape)


def check_nm_shape(columns: int, n: int, m: int, who: str = "an n:m pattern") -> None:
    """ValueError when ``columns`` cannot be cut into groups of ``m``."""
    if not 0 < n < m:
        raise ValueError(f"{who}: n:m needs 0 < n < m, got {n}:{m}")
    if columns % m:
        raise ValueError(
            f"{who} {n}:{m} groups each row's columns by {m}, but the layer has {columns} "
            f"input columns; use a projection whose input size is a multiple of {m}, or "
            "the unstructured pattern"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The ``m - n`` lowest of every ``m`` consecutive columns of each row."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [rows, columns], got {list(scores.shape)}")
    rows, cols = scores.shape
    check_nm_shape(cols, n, m)
    groups = scores.reshape(rows * (cols // m), m)
    return _lowest(groups, m - n).reshape(rows, cols)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every run of ``m`` consecutive columns of each row has at most ``n``
    non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight != 0).reshape(rows, cols // m, m).sum(dim=-1)
    return bool((nonzero <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight == 0).double().mean()) if weight.numel() else 0.0
