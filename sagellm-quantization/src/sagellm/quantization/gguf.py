"""``gguf``: run a GGUF checkpoint's quantized blocks on torch's CPU kernels.

Q4_1 and Q4_0 projections go onto the int4 kernel unchanged (exact, group 32: see
:mod:`.formats`); Q8_0 ones (the embedded model's tied embedding and head) onto the int8
kernel with one scale per row; any other format keeps the float method, with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from pydantic import BaseModel
from torch import nn

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import PackedWeight, QuantizationProfile
from sagellm.quantization.config import GGUFConfig
from sagellm.quantization.methods import Int4Method, Int8Method
from sagellm.quantization.rtn import head_method

__all__ = ["GGUFQuantizer"]

logger = logging.getLogger(__name__)


class GGUFQuantizer:
    """Linear methods that compute on each projection's GGUF blocks (``gguf``)."""

    config_class: ClassVar[type[BaseModel]] = GGUFConfig

    def __init__(self, config: GGUFConfig | None = None, **_context: object) -> None:
        self.config = config or GGUFConfig()
        self._unsupported: set[str] = set()

    def profile(self) -> QuantizationProfile:
        """GGUF blocks as stored (4-bit groups of 32 for Q4_0/Q4_1)."""
        return QuantizationProfile(method="gguf", weight_bits=4, group_size=32, symmetric=False)

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Nothing to calibrate; raises ValueError when no layer carries GGUF blocks."""
        if layers and not any(getattr(m, "packed", None) is not None for m in layers.values()):
            raise ValueError(
                "quantization 'gguf' needs a GGUF checkpoint with quantized weights; this "
                "model has none: use 'int4' or 'int8' to quantize a float checkpoint"
            )

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """int4 for Q4_0/Q4_1 blocks, int8 for Q8_0; None for a layer without blocks."""
        packed: PackedWeight | None = getattr(layer, "packed", None)
        if name == "lm_head":
            return head_method(self.config, from_gguf=packed is not None)
        if packed is None:
            return None
        rows = self.config.dense_min_rows
        if packed.format in ("q4_0", "q4_1"):
            return Int4Method(32, dense_min_rows=rows, from_gguf=True)
        if packed.format == "q8_0":
            return Int8Method(dense_min_rows=rows, from_gguf=True)
        if packed.format not in self._unsupported:
            self._unsupported.add(packed.format)
            logger.info("gguf: %s blocks have no native kernel; computing in float", packed.format)
        return None
