"""Float projections on oneDNN with the weight reordered once, at load time.

``F.linear`` on a CPU hands a plain ``[N, K]`` weight to oneDNN on every call, which
reorders it into its blocked layout each time; ``torch.ops.mkldnn._reorder_linear_weight``
does that once and ``torch.ops.mkldnn._linear_pointwise`` then multiplies by the blocked
weight directly (what inductor's CPU weight prepacking emits under ``freezing``). Measured
on the embedded model's projection shapes, 2 threads, bf16, four layers' weights:
1.7-2.9x faster than ``F.linear`` from 1 to 100 rows, 1.09x at 512.

:class:`OneDNNInt8Linear` is the W8A8 form of the same products: the weight quantized to
int8 per output channel (symmetric, round to nearest) and prepacked once by
``torch.ops.onednn.qlinear_prepack``; each call quantizes its input rows to int8 with a
scale per row and runs oneDNN's int8 product (``csrc/int8_linear.cpp``). On AVX512-VNNI
the int8 product does twice the multiply-adds per instruction of the bfloat16 one:
measured on the embedded model's four projection shapes, 2 threads, against the bf16
blocked product: 1.2-1.6x faster at 64 rows, 1.2-2.0x at 512, slower below 16 rows
(where the quantization pass is not paid back), with a relative error of ~1.3% per
product on Gaussian data.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import nn

from sagellm.kernel_fusion.extension import load_kernels

__all__ = ["OneDNNInt8Linear", "OneDNNLinear", "int8_linear_available", "onednn_available"]


@functools.cache
def onednn_available(dtype: torch.dtype) -> bool:
    """True when oneDNN's prepacked linear runs here in ``dtype`` (and agrees with F.linear)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        w = torch.arange(48, dtype=torch.float32).reshape(3, 16).div(7).to(dtype)
        x = torch.ones(2, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(y.float(), torch.nn.functional.linear(x, w).float(), rtol=1e-2))


class OneDNNLinear:
    """A :class:`~sagellm.core.protocols.LinearMethod` on oneDNN's blocked weight layout.

    ``process_weights`` replaces the layer's ``weight`` by the blocked copy (``onednn_weight``):
    the plain weight is dropped, so the layer holds one copy. ``batch_hint`` is the row
    count oneDNN picks its blocking for; any row count is then accepted.
    """

    name = "onednn"

    def __init__(self, batch_hint: int = 64) -> None:
        self.batch_hint = batch_hint

    def process_weights(self, layer: nn.Module) -> None:
        """Reorder the layer's CPU float weight into oneDNN's layout."""
        w = getattr(layer, "weight", None)
        if w is None:
            raise ValueError("OneDNNLinear needs the layer's float weight")
        if w.device.type != "cpu" or not onednn_available(w.dtype):
            raise ValueError(f"oneDNN linear is not available for {w.dtype} on {w.device}")
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.batch_hint)
        layer.register_buffer("onednn_weight", packed, persistent=False)
        layer.register_parameter("weight", None)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)`` through the blocked weight."""
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, layer.onednn_weight, layer.bias, "none", [], ""
        )
        return y


@functools.cache
def int8_linear_available() -> bool:
    """True when oneDNN's int8 product and the package's kernels run here (and agree with a
    float32 product of the same quantized operands)."""
    module = load_kernels()
    if module is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.arange(-24, 24, dtype=torch.float32).reshape(3, 16)
        x = torch.linspace(-1.0, 1.0, 32).reshape(2, 16)
        packed, scales = _quantize_weight(w, 2)
        zero_points = torch.zeros(3, dtype=torch.int64)
        y = module.w8a8_linear(x, packed, scales, zero_points, None)
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(y, x @ w.T, rtol=0.05, atol=0.05))


def _quantize_weight(w: torch.Tensor, batch_hint: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prepacked int8 weight, float32 scales [N])`` of ``w [N, K]``: per output channel,
    symmetric, ``scale = amax / 127`` (1 for a row of zeros), rounded to nearest."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w32 / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(q, [batch_hint, w.shape[1]])
    return packed, scales.contiguous()


class OneDNNInt8Linear:
    """A :class:`~sagellm.core.protocols.LinearMethod` computing W8A8 on oneDNN's int8
    product (see the module doc).

    ``process_weights`` replaces the layer's float ``weight`` by ``int8_weight`` (prepacked)
    and ``int8_scales`` (float32 ``[N]``); ``apply`` quantizes each input row with its own
    scale. The result has the input's dtype (float32 or bfloat16).
    """

    name = "onednn_int8"

    def __init__(self, batch_hint: int = 64) -> None:
        self.batch_hint = batch_hint
        self._module: Any = load_kernels()
        if self._module is None:
            raise RuntimeError(
                "the W8A8 product needs sageLLM's compiled CPU kernels, which could not be "
                "built here (see the log); use the float product (OneDNNLinear) instead"
            )

    def process_weights(self, layer: nn.Module) -> None:
        """Quantize and prepack the layer's CPU float weight; the float weight is dropped."""
        w = getattr(layer, "weight", None)
        if w is None:
            raise ValueError("OneDNNInt8Linear needs the layer's float weight")
        if w.device.type != "cpu" or not int8_linear_available():
            raise ValueError(f"oneDNN's int8 product is not available on {w.device}")
        packed, scales = _quantize_weight(w, self.batch_hint)
        layer.register_buffer("int8_weight", packed, persistent=False)
        layer.register_buffer("int8_scales", scales, persistent=False)
        layer.register_buffer(
            "int8_zero_points", torch.zeros(scales.numel(), dtype=torch.int64), persistent=False
        )
        layer.register_parameter("weight", None)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)`` for ``x [..., K]`` through the int8 product."""
        shape = x.shape
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        y = cast(
            torch.Tensor,
            self._module.w8a8_linear(
                x.reshape(-1, shape[-1]),
                layer.int8_weight,
                layer.int8_scales,
                layer.int8_zero_points,
                layer.bias,
            ),
        )
        return y.reshape(*shape[:-1], y.shape[-1])
