"""``sparsegpt``: pruning with reconstruction (Frantar and Alistarh, arXiv 2301.00774).

Per projection SparseGPT minimises ``||W X - W' X||^2`` over the calibration inputs with
``W'`` restricted to a mask. It walks the input columns in order; a pruned weight's
error ``w / [H^-1]_cc`` is spread over the columns not yet visited through the inverse
Hessian ``H^-1`` (``H = X^T X`` plus a dampening of its diagonal), as optimal brain
surgeon prescribes, so the kept weights absorb what the pruned ones contributed. The
mask is chosen per block of ``block_size`` columns on the weights as they are when the
block is reached (already updated by the blocks before), by the OBS saliency
``w^2 / [H^-1]_cc^2``: over the whole block for unstructured sparsity, per run of ``m``
columns for n:m. The update within a block is column by column, lazily applied to the
rest of the matrix once per block, from the upper Cholesky factor of ``H^-1``.

Every projection is calibrated on the inputs it gets in one dense-model pass over the
calibration text (all Hessians at once), not block by block on the pruned model.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel

from sagellm.sparsity.config import SparseGPTConfig
from sagellm.sparsity.masks import num_pruned
from sagellm.sparsity.pruning import MaskingSparsifier

__all__ = ["SparseGPTSparsifier", "inverse_hessian_factor", "sparsegpt_prune"]


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (float64 inside)."""
    h64 = h.double()
    mean_diag = h64.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h64.shape[0], dtype=torch.float64, device=h.device)
    for attempt in range(6):  # a rank-deficient H (few tokens) needs more dampening
        lower, info = torch.linalg.cholesky_ex(h64 + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True).float()
    raise ValueError("sparsegpt: the calibration Hessian is not positive definite even dampened")


def sparsegpt_prune(
    w: torch.Tensor,
    xtx: torch.Tensor,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """The SparseGPT-pruned float32 copy of ``w`` ``[N, K]`` given ``xtx = X^T X``.

    ``nm=(n, m)``: at most ``n`` non-zeros per ``m`` columns of a row (then ``sparsity``
    is ignored). Input channels that never saw a non-zero input get zero weights.
    """
    n_rows, k = w.shape
    if tuple(xtx.shape) != (k, k):
        raise ValueError(f"a Hessian of shape {list(xtx.shape)} does not fit {k} input columns")
    if nm is not None and (block_size % nm[1] or k % nm[1]):
        raise ValueError(
            f"sparsegpt: block_size {block_size} and the {k} input columns must be "
            f"multiples of m={nm[1]}"
        )
    weight = w.detach().float().clone()
    h = xtx.detach().float().clone().to(weight.device)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    u = inverse_hessian_factor(h, damp)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        count = i2 - i1
        w1 = weight[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        if nm is None:
            saliency = w1.pow(2) / d.pow(2)[None, :]
            num = num_pruned(saliency.numel(), sparsity)
            mask1 = torch.zeros(saliency.numel(), dtype=torch.bool, device=w1.device)
            if num:
                mask1[torch.argsort(saliency.reshape(-1), stable=True)[:num]] = True
            mask1 = mask1.reshape(saliency.shape)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                # the group's mask on the weights as the updates so far left them
                n, m = nm
                sal = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                low = torch.argsort(sal, dim=1, stable=True)[:, : m - n]
                mask1[:, i : i + m].scatter_(1, low, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            err = (col - q) / d[i]
            # spread the pruned weights' error over this block's later columns
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            q1[:, i] = q
            err1[:, i] = err
        weight[:, i1:i2] = q1
        weight[:, i2:] -= err1 @ u[i1:i2, i2:]
    return weight


class SparseGPTSparsifier(MaskingSparsifier):
    """``sparsegpt``: masks chosen by OBS saliency, the kept weights updated to make up."""

    config_class: ClassVar[type[BaseModel]] = SparseGPTConfig
    method: ClassVar[str] = "sparsegpt"
    calibrates: ClassVar[bool] = True

    def needs_xtx(self, name: str) -> bool:
        """Every pruned projection needs its Hessian."""
        return True

    def prune(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """:func:`sparsegpt_prune` of the layer on its calibration Hessian."""
        cfg = self.config
        assert isinstance(cfg, SparseGPTConfig)
        xtx = self.stats[name].xtx
        assert xtx is not None
        block = cfg.block_size
        if self.nm is not None and block % self.nm[1]:
            block = max(self.nm[1], block - block % self.nm[1])
        return sparsegpt_prune(
            weight, xtx, sparsity=cfg.sparsity, nm=self.nm, damp=cfg.damp, block_size=block
        )
