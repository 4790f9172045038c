"""SwiGLU activation over a fused gate/up projection."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SiluAndMul"]


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[..., 2 * width]`` = gate then up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
