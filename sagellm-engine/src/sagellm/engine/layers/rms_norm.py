"""RMSNorm, optionally fused with the residual addition that precedes it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 whatever the activation dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        # Low-precision activations are normalised in float32 (as the reference models do);
        # the weight multiplies after the cast back, again as they do.
        y = F.rms_norm(x.float(), (self.hidden_size,), None, self.eps).to(x.dtype)
        return y * self.weight

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(norm(x + residual), x + residual)``: the residual stream moves on."""
        residual = x.add_(residual)
        return self.forward(residual), residual
