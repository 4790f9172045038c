"""Configuration of the quantizers, one frozen model each."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GGUFConfig", "Int4Config", "Int8Config", "QuantizationConfig"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class QuantizationConfig(BaseModel):
    """Options every weight-only quantizer shares."""

    model_config = _FROZEN

    # rows (tokens in a step) from which the float weight is used instead of the quantized
    # kernel (the int kernels are small-M kernels); None drops the float weight: less
    # memory, every batch size on the quantized kernel
    dense_min_rows: int | None = Field(16, ge=2)
    # the output head: "int8" (one scale per row), "int4" (group 32), or "dense"
    head: Literal["int8", "int4", "dense"] = "int8"


class GGUFConfig(QuantizationConfig):
    """``gguf``: compute on a GGUF checkpoint's own blocks."""


class Int4Config(QuantizationConfig):
    """``int4``: asymmetric round-to-nearest, one scale and zero per group."""

    group_size: Literal[32, 64, 128] = 32  # input columns per scale; falls back to one
    # that divides a projection's columns (576 takes 32 or 64) with a log line


class Int8Config(QuantizationConfig):
    """``int8``: symmetric round-to-nearest, one scale per output row."""
