"""SwiGLU activation over a fused gate/up projection."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.engine.layers.rms_norm import FUSED_MAX_ROWS

__all__ = ["SiluAndMul"]


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[..., 2 * width]`` = gate then up."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Any = None  # a kernel provider's fused ops (silu_and_mul); None: eager
        self.fused_max_rows = FUSED_MAX_ROWS  # steps up to this many rows use them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.kernels is not None
            and x.dim() == 2
            and x.shape[0] <= self.fused_max_rows
            and x.is_contiguous()
        ):
            y: torch.Tensor = self.kernels.silu_and_mul(x)
            return y
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
