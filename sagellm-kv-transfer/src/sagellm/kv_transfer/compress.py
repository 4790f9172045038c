"""int8 compression of KV blocks on the wire: absmax per block and head.

Anchor: the int8 KV caches of vLLM and LMDeploy (a scale per token-head row) and
SGLang's RFC on compressing KV for P->D transfer (sglang#39740, no figures). Difference:
one scale per block and head (all ``block_size`` tokens and ``head_dim`` values of it),
so scales cost 4 bytes per ``block_size * head_dim`` values and the wire carries close
to a quarter of float32 (half of bfloat16). Error: each value moves by at most half a
step, ``absmax / 254`` of its block and head, before rounding to the pool's dtype.
"""

from __future__ import annotations

import torch

__all__ = ["error_bound", "quantize_into", "dequantize"]


def quantize_into(x: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Quantize ``x`` ``[n, block, heads, dim]`` into ``q_out`` (int8, same shape) and
    ``scale_out`` (float32 ``[n, heads]``)."""
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 3))
    scale = amax / 127.0
    # an all-zero block-head gets scale 0 and decodes to zeros; divide by 1 there
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe[:, None, :, None]).clamp_(-127, 127)
    q_out.copy_(q)
    scale_out.copy_(scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values of ``q`` (int8 ``[n, block, heads, dim]``) times ``scale`` ``[n, heads]``."""
    return (q.float() * scale[:, None, :, None]).to(dtype)


def error_bound(x: torch.Tensor) -> torch.Tensor:
    """Largest error int8 transfer may add to each value of ``x``, before dtype rounding."""
    amax = x.float().abs().amax(dim=(1, 3), keepdim=True)
    return (amax / 254.0).expand_as(x)
