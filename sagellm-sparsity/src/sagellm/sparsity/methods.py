"""The 2:4 linear method: torch's semi-structured sparse tensors on CUDA.

``torch.sparse.to_sparse_semi_structured`` packs a 2:4 weight into its non-zeros plus
metadata for the sparse tensor cores (NVIDIA Ampere and newer, float16 / bfloat16). torch
has no CPU kernel for it: on CPU the conversion raises ("Only CUDA tensors are currently
supported"), so there the pruned weight stays a dense matrix with zeros and gives no
speedup. :func:`semi_structured_support` says, at run time, whether a device can use it
and why not.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.sparsity.masks import is_nm_sparse

__all__ = ["SemiStructuredMethod", "semi_structured_support"]

_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_support(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when a 2:4 weight on ``device`` in ``dtype`` can use torch's semi-structured
    kernels; otherwise the reason it cannot."""
    sparse = getattr(torch, "sparse", None)
    if sparse is None or not hasattr(sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if device.type != "cuda":
        return (
            f"torch has semi-structured (2:4) kernels only on CUDA, not on {device.type}: "
            "the pruned weight is multiplied densely"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, _minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 sparse tensor cores need compute capability 8.0 or newer, not {major}.x"
    if dtype not in _DTYPES:
        return f"semi-structured kernels take float16 or bfloat16 weights, not {dtype}"
    return None


class SemiStructuredMethod:
    """``x @ W.T`` with ``W`` (2:4 sparse) as a torch semi-structured sparse tensor."""

    name = "sparse_2:4"

    def process_weights(self, layer: nn.Module) -> None:
        """Pack ``layer.weight`` (CUDA, float16/bfloat16, 2:4) into ``layer.sparse_weight``.

        Raises ValueError when the device, the dtype, the pattern or the shape do not
        suit the kernels (the message says what does).
        """
        weight = cast(torch.Tensor, layer.weight)
        reason = semi_structured_support(weight.device, weight.dtype)
        if reason is not None:
            raise ValueError(f"sparse_2:4: {reason}")
        if not is_nm_sparse(weight, 2, 4):
            raise ValueError(
                "sparse_2:4: the weight is not 2:4 sparse; prune it with pattern='2:4' first"
            )
        rows, cols = weight.shape
        if rows % 64 or cols % 64:
            raise ValueError(
                f"sparse_2:4: torch's kernels take weights whose both sizes are multiples "
                f"of 64; this one is {rows} x {cols}"
            )
        from torch.sparse import to_sparse_semi_structured

        sparse: Any = to_sparse_semi_structured(weight.detach())
        layer.sparse_weight = sparse

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)``; ``x`` ``[M, K]`` in the weight's dtype."""
        bias = cast("torch.Tensor | None", layer.bias)
        return F.linear(x, cast(torch.Tensor, layer.sparse_weight), bias)
