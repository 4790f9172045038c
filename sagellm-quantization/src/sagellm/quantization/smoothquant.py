"""``smoothquant``: W8A8 projections (Xiao et al., arXiv 2211.10438) on ``torch._int_mm``.

Activations of LLMs have outlier channels that per-token int8 cannot represent, while
weights are easy to quantize. SmoothQuant moves the difficulty into the weights with a
per-input-channel factor ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``max|X_j|``
over the calibration text): ``x W^T = (x / s) (W s)^T``. The smoothed weight is int8 with
one scale per output row; at run time the smoothed input is int8 with one scale per
token (row), the product runs in int8 x int8 -> int32 through ``torch._int_mm`` (VNNI on
these CPUs) and both scales are applied to the int32 result.

``_int_mm`` pays off for many rows (prefill, batched decode); below ``w8a8_min_rows``
rows the method runs the weight-only int8 kernel ``_weight_int8pack_mm`` on the same
int8 weight (``x / s`` against ``q * scale``), which streams half the bytes of bf16.
On CPU ``_int_mm`` takes any ``M``, ``K`` and ``N`` (checked on torch 2.13; CUDA needs
``M > 16`` and multiples of 8); the weight-only kernel needs ``K % 16 == 0``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, cast

import torch
from pydantic import BaseModel
from torch import nn
from torch.nn import functional as F

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import QuantizationProfile
from sagellm.quantization.calibration import Tokenize, calibrate
from sagellm.quantization.config import SmoothQuantConfig
from sagellm.quantization.formats import int8_rtn
from sagellm.quantization.methods import buffer, input_size
from sagellm.quantization.rtn import head_method

__all__ = ["SmoothQuantMethod", "SmoothQuantQuantizer", "quantize_per_token", "smooth_scales"]

logger = logging.getLogger(__name__)


def smooth_scales(act_max: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input channel (float32 [K])."""
    w_max = w.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    a = act_max.float().clamp_min(1e-5)
    return (a.pow(alpha) / w_max.pow(1.0 - alpha)).clamp_min(1e-5)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [M, K], scale float32 [M, 1])`` with ``x ~ q * scale``, symmetric per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
    q = (xf / scale).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


class SmoothQuantMethod:
    """int8 weights of ``W * s`` (one scale per row); int8 activations of ``x / s``.

    ``smoothing`` is ``s`` (float ``[K]``). From ``w8a8_min_rows`` rows the product runs
    through ``torch._int_mm``, below it through the weight-only int8 kernel; from
    ``dense_min_rows`` rows (None: never) through the layer's float weight.
    """

    def __init__(
        self,
        smoothing: torch.Tensor,
        *,
        w8a8_min_rows: int = 16,
        dense_min_rows: int | None = None,
        name: str = "w8a8_smoothquant",
    ) -> None:
        if dense_min_rows is not None and dense_min_rows < 2:
            raise ValueError("dense_min_rows must be at least 2 (or None: never dense)")
        if w8a8_min_rows < 1:
            raise ValueError("w8a8_min_rows must be at least 1")
        self.smoothing = smoothing
        self.w8a8_min_rows = w8a8_min_rows
        self.dense_min_rows = dense_min_rows
        self.name = name

    def process_weights(self, layer: nn.Module) -> None:
        """Smooth and quantize the weight; register it with ``1 / s`` on the layer."""
        w = getattr(layer, "weight", None)
        if w is None:
            raise ValueError(f"{type(layer).__name__} has no float weight to quantize")
        n, k = w.shape
        if k % 16:
            raise ValueError(
                f"smoothquant needs a multiple of 16 input columns (the int8 kernel's), "
                f"got a {n}x{k} projection"
            )
        if tuple(self.smoothing.shape) != (k,):
            raise ValueError(
                f"a smoothing factor of shape {list(self.smoothing.shape)} does not fit "
                f"{k} input columns"
            )
        s = self.smoothing.float()
        q, scale = int8_rtn(w.float() * s)
        dev = w.device
        layer.register_buffer("qweight", q.to(dev), persistent=False)
        layer.register_buffer("weight_scales", scale.to(dev), persistent=False)  # float32
        layer.register_buffer("weight_scales_x", scale.to(dev, w.dtype), persistent=False)
        layer.register_buffer("input_scale", (1.0 / s).to(dev), persistent=False)  # float32
        layer.register_buffer("input_scale_x", (1.0 / s).to(dev, w.dtype), persistent=False)
        if self.dense_min_rows is None:
            layer.register_parameter("weight", None)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)`` through the path of ``x``'s row count, in ``x``'s dtype."""
        m = x.shape[0]
        bias = cast("torch.Tensor | None", layer.bias)
        if self.dense_min_rows is not None and m >= self.dense_min_rows:
            return F.linear(x, buffer(layer, "weight"), bias)
        qweight = buffer(layer, "qweight")
        if m < self.w8a8_min_rows:
            y = torch.ops.aten._weight_int8pack_mm(
                x * buffer(layer, "input_scale_x"), qweight, buffer(layer, "weight_scales_x")
            )
        else:
            xq, xs = quantize_per_token(x.float() * buffer(layer, "input_scale"))
            acc = torch._int_mm(xq, qweight.t())
            y = (acc.float() * xs * buffer(layer, "weight_scales")).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y


class SmoothQuantQuantizer:
    """W8A8 projections smoothed on the shipped calibration text (``smoothquant``).

    Context: ``tokenize`` (``str -> list[int]``, the model's tokenizer); :meth:`prepare`
    raises ValueError without it. The head follows ``config.head`` (weight-only).
    """

    config_class: ClassVar[type[BaseModel]] = SmoothQuantConfig

    def __init__(
        self,
        config: SmoothQuantConfig | None = None,
        *,
        tokenize: Tokenize | None = None,
        **_context: object,
    ) -> None:
        self.config = config or SmoothQuantConfig()
        self.tokenize = tokenize
        self._smoothing: dict[str, torch.Tensor] = {}

    def profile(self) -> QuantizationProfile:
        """int8 weights (per channel) and int8 activations (per token)."""
        return QuantizationProfile(
            method="smoothquant", weight_bits=8, activation_bits=8, symmetric=True
        )

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Collect each projection's ``max|x|`` per channel; compute its smoothing.

        Raises ValueError when ``run`` or ``tokenize`` is missing or a projection's
        columns are not a multiple of 16.
        """
        targets = {name: layer for name, layer in layers.items() if name != "lm_head"}
        for name, layer in targets.items():
            k = input_size(layer)
            if k % 16:
                raise ValueError(
                    f"smoothquant: {name} has {k} input columns; the int8 kernels need a "
                    "multiple of 16"
                )
        if not targets:
            return
        t0 = time.perf_counter()
        stats = calibrate(targets, run, self.tokenize, self.config, xtx=False, who="smoothquant")
        for name, layer in targets.items():
            self._smoothing[name] = smooth_scales(
                stats[name].abs_max, buffer(layer, "weight"), self.config.alpha
            )
        logger.info(
            "smoothquant: %d projections smoothed (alpha %.2f) in %.1f s",
            len(targets),
            self.config.alpha,
            time.perf_counter() - t0,
        )

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """A :class:`SmoothQuantMethod` per calibrated projection; the head by config."""
        if name == "lm_head":
            return head_method(self.config, from_gguf=False)
        s = self._smoothing.pop(name, None)
        if s is None:
            raise ValueError(
                f"smoothquant: projection {name!r} was not calibrated; pass it to "
                "prepare(layers, run) before asking for its method"
            )
        cfg = self.config
        return SmoothQuantMethod(
            s, w8a8_min_rows=cfg.w8a8_min_rows, dense_min_rows=cfg.dense_min_rows
        )
