"""Round-to-nearest weight-only quantizers from any float checkpoint: ``int8`` and ``int4``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, cast

from pydantic import BaseModel
from torch import nn

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import QuantizationProfile
from sagellm.quantization.config import Int4Config, Int8Config, QuantizationConfig
from sagellm.quantization.formats import INT4_GROUP_SIZES
from sagellm.quantization.methods import Int4Method, Int8Method, input_size

__all__ = ["Int4Quantizer", "Int8Quantizer", "head_method", "int4_group_for"]

logger = logging.getLogger(__name__)


def int4_group_for(requested: int, input_size: int) -> int:
    """``requested`` if it divides ``input_size``, else the largest kernel group that does."""
    if input_size % requested == 0:
        return requested
    fits = [g for g in INT4_GROUP_SIZES if g < requested and input_size % g == 0]
    if not fits:
        raise ValueError(
            f"no int4 group size divides {input_size} input columns "
            f"(the CPU kernel takes {', '.join(map(str, INT4_GROUP_SIZES))})"
        )
    return fits[-1]


def head_method(config: QuantizationConfig, *, from_gguf: bool) -> LinearMethod | None:
    """The output head's method by ``config.head``."""
    if config.head == "dense":
        return None
    if config.head == "int4":
        return Int4Method(32, dense_min_rows=config.dense_min_rows, name="head_int4_g32")
    # Q8_0 blocks (the GGUF head) are kept exactly with their own 32-column scales
    return Int8Method(
        32 if from_gguf else None, dense_min_rows=config.dense_min_rows, from_gguf=from_gguf
    )


class Int8Quantizer:
    """Per-channel int8 weights on every projection and the head (``int8``)."""

    config_class: ClassVar[type[BaseModel]] = Int8Config

    def __init__(self, config: Int8Config | None = None, **_context: object) -> None:
        self.config = config or Int8Config()

    def profile(self) -> QuantizationProfile:
        """int8 weights, per-channel symmetric scales."""
        return QuantizationProfile(method="int8", weight_bits=8, symmetric=True)

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Nothing to calibrate."""

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """An :class:`Int8Method` for every projection; the head by ``config.head``."""
        if name == "lm_head":
            return head_method(self.config, from_gguf=False)
        return Int8Method(dense_min_rows=self.config.dense_min_rows)


class Int4Quantizer:
    """Group-wise int4 weights on every projection (``int4``), round-to-nearest.

    Subclasses that calibrate (GPTQ, AWQ) keep its group choice and head and replace
    :meth:`quantize_layer` (the codes of one projection) and :meth:`prepare`.
    """

    config_class: ClassVar[type[BaseModel]] = Int4Config
    method: ClassVar[str] = "int4"  # the profile's method

    def __init__(self, config: Int4Config | None = None, **_context: object) -> None:
        self.config = cast(Int4Config, config or self.config_class())

    def profile(self) -> QuantizationProfile:
        """int4 weights (``bits`` codes) with one scale and zero per group."""
        cfg = self.config
        return QuantizationProfile(
            method=self.method,  # type: ignore[arg-type]
            weight_bits=cfg.bits,
            group_size=cfg.group_size,
            symmetric=cfg.symmetric,
        )

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Nothing to calibrate."""

    def group_for(self, name: str, layer: nn.Module) -> int:
        """The group size of projection ``name`` (the configured one where it divides)."""
        k = input_size(layer)
        group = int4_group_for(self.config.group_size, k)
        if group != self.config.group_size:
            logger.info(
                "%s: %d input columns take int4 group %d, not %d",
                name,
                k,
                group,
                self.config.group_size,
            )
        return group

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """An :class:`Int4Method` per projection (group size fitted to its columns)."""
        if name == "lm_head":
            return head_method(self.config, from_gguf=False)
        cfg = self.config
        return Int4Method(
            self.group_for(name, layer),
            dense_min_rows=cfg.dense_min_rows,
            bits=cfg.bits,
            symmetric=cfg.symmetric,
        )
