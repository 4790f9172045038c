"""Quantized KV rows: one token-head's values in a 1-byte type, then its float16 scale.

A quantized cache stores each token-head row as ``head_dim`` int8 / float8 elements
followed by the row's scale, a float16 bit-cast into :data:`SCALE_ELEMENTS` elements of
the same 1-byte type (the pool's ``KVCacheSchema.scale_bytes`` = 2). The scale is
``amax(|row|) / qmax``, so every row uses its type's whole range:

* int8: ``round(x / scale)`` clamped to +-127; the error of a value is at most half a
  step (``scale / 2``);
* float8_e4m3fn (qmax 448) and float8_e5m2 (qmax 57344): ``x / scale`` cast, a relative
  error of at most 2^-4 and 2^-3 (3 and 2 mantissa bits, round to nearest).

The scale is at least float16's smallest normal number (6.1e-5), so it keeps its full
precision; a row smaller than ``qmax`` times that (an e5m2 row under 3.5) then uses part
of the range, which costs a float format nothing and int8 only below 0.008.

Values and scale travel together in one row, so block copies and tier moves need no
knowledge of the format. vLLM's fp8 KV cache keeps one scale per tensor instead; a scale
per token-head costs 2 bytes per 64 values here and needs no calibration.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX", "SCALE_ELEMENTS", "dequantize_rows", "quantize_rows"]

#: Largest magnitude each quantized cache type stores.
QMAX: dict[torch.dtype, float] = {
    torch.int8: 127.0,
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
}

#: 1-byte elements after the values of a row that hold its float16 scale.
SCALE_ELEMENTS = 2

# a row of zeros (or of tiny values) keeps a finite, normal float16 scale; a huge row
# saturates instead of overflowing float16
_MIN_SCALE = float(torch.finfo(torch.float16).tiny)
_MAX_SCALE = float(torch.finfo(torch.float16).max)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` ``[..., D]`` as quantized rows ``[..., D + 2]`` of ``dtype`` (int8 or float8)."""
    qmax = QMAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_(_MIN_SCALE, _MAX_SCALE)
    scale = scale.to(torch.float16)
    # divide by the scale as stored, so dequantizing undoes exactly this step
    y = (xf / scale.float()).clamp_(-qmax, qmax)
    values = y.round_().to(dtype) if dtype is torch.int8 else y.to(dtype)
    return torch.cat([values, scale.view(dtype)], -1)


def dequantize_rows(rows: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Quantized rows ``[..., head_dim + 2]`` back to ``[..., head_dim]`` values of ``dtype``."""
    scale = rows[..., head_dim:].view(torch.float16)
    return rows[..., :head_dim].to(dtype) * scale.to(dtype)
