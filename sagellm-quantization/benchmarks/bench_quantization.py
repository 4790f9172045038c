"""asv benchmarks of sagellm.quantization, each side by side with its anchor.

``Kernels`` times the int4 (group 32) and int8 weight-only kernels next to bf16
``F.linear`` on the embedded model's projection shapes at 1, 16 and 64 rows, and
``W8A8`` the SmoothQuant product at 64 and 512 rows; their ``track_*`` methods report
the ratio to bf16 measured in the same process with the calls interleaved (below 1:
faster than bf16). ``QuantizeTime`` times GPTQ and AWQ against round-to-nearest on one
1536 -> 576 projection (the down projection; a 1536x1536 Hessian).
"""

from __future__ import annotations

import torch

from sagellm.core.testing.quantizer import activations
from sagellm.quantization.awq import awq_quantize
from sagellm.quantization.bench import SHAPES, Kernels, interleaved
from sagellm.quantization.formats import int4_rtn
from sagellm.quantization.gptq import gptq_quantize

_KERNELS: dict[str, Kernels] = {}


def _kernels(shape: str) -> Kernels:
    if shape not in _KERNELS:
        _KERNELS[shape] = Kernels(shape)
    return _KERNELS[shape]


class WeightOnly:
    """int4 g32 and int8 kernels against bf16 F.linear (batch-1 to 64-row decode)."""

    params = [list(SHAPES), [1, 16, 64]]
    param_names = ["shape", "rows"]
    timeout = 120

    def setup(self, shape: str, rows: int) -> None:
        self.k = _kernels(shape)
        self.x = self.k.inputs(rows)

    def time_bf16(self, shape: str, rows: int) -> None:
        self.k.bf16(self.x)

    def time_int4(self, shape: str, rows: int) -> None:
        self.k.int4(self.x)

    def time_int8(self, shape: str, rows: int) -> None:
        self.k.int8(self.x)

    def _ratio(self, method: str) -> float:
        t = interleaved(
            {"bf16": lambda: self.k.bf16(self.x), method: lambda: getattr(self.k, method)(self.x)}
        )
        return t[method] / t["bf16"]

    def track_int4_ratio_to_bf16(self, shape: str, rows: int) -> float:
        return self._ratio("int4")

    track_int4_ratio_to_bf16.unit = "ratio"  # type: ignore[attr-defined]

    def track_int8_ratio_to_bf16(self, shape: str, rows: int) -> float:
        return self._ratio("int8")

    track_int8_ratio_to_bf16.unit = "ratio"  # type: ignore[attr-defined]


class W8A8:
    """SmoothQuant's int8 x int8 product (torch._int_mm) against bf16 F.linear."""

    params = [list(SHAPES), [64, 512]]
    param_names = ["shape", "rows"]
    timeout = 120

    def setup(self, shape: str, rows: int) -> None:
        self.k = _kernels(shape)
        self.x = self.k.inputs(rows)

    def time_bf16(self, shape: str, rows: int) -> None:
        self.k.bf16(self.x)

    def time_smoothquant(self, shape: str, rows: int) -> None:
        self.k.smoothquant(self.x)

    def track_smoothquant_ratio_to_bf16(self, shape: str, rows: int) -> float:
        t = interleaved(
            {"bf16": lambda: self.k.bf16(self.x), "w8a8": lambda: self.k.smoothquant(self.x)}
        )
        return t["w8a8"] / t["bf16"]

    track_smoothquant_ratio_to_bf16.unit = "ratio"  # type: ignore[attr-defined]


class QuantizeTime:
    """Quantizing one 1536 -> 576 projection at group 64 from 2,048 calibration rows."""

    timeout = 300
    number = 1
    repeat = 3

    def setup(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(576, 1536, generator=gen) * 1536**-0.5
        x = activations(1536, 2048, seed=1)
        self.xtx = x.t() @ x
        self.abs_mean = x.abs().mean(dim=0)

    def time_rtn(self) -> None:
        int4_rtn(self.w, 64)

    def time_gptq(self) -> None:
        gptq_quantize(self.w, self.xtx, 64)

    def time_awq(self) -> None:
        awq_quantize(self.w, self.xtx, self.abs_mean, 64)

    def track_gptq_ratio_to_rtn(self) -> float:
        t = interleaved(
            {
                "rtn": lambda: int4_rtn(self.w, 64),
                "gptq": lambda: gptq_quantize(self.w, self.xtx, 64),
            },
            repeat=3,
        )
        return t["gptq"] / t["rtn"]

    track_gptq_ratio_to_rtn.unit = "ratio"  # type: ignore[attr-defined]
