"""Configuration of the quantizers, one frozen model each."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AWQConfig",
    "CalibrationOptions",
    "GGUFConfig",
    "GPTQConfig",
    "Int4Config",
    "Int8Config",
    "QuantizationConfig",
    "SmoothQuantConfig",
]

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
    # codes per weight: 4 uses the kernel's 16 levels; 3 and 2 use 8 and 4 of them (same
    # bytes and speed: for accuracy studies, where round-to-nearest breaks down)
    bits: Literal[2, 3, 4] = 4
    # symmetric grids have no zero offset (w = (q - 8) * scale); asymmetric ones map each
    # group's minimum and maximum onto the lowest and highest code
    symmetric: bool = False


class Int8Config(QuantizationConfig):
    """``int8``: symmetric round-to-nearest, one scale per output row."""


class CalibrationOptions(BaseModel):
    """How much of the shipped calibration text a calibrating quantizer runs."""

    model_config = _FROZEN

    # tokens of the calibration text (data/calibration.txt) run through the model; the
    # whole text when it has fewer
    calibration_tokens: int = Field(4096, ge=8)
    calibration_seq_len: int = Field(512, ge=8)  # tokens per forward pass (one sequence)


class GPTQConfig(Int4Config, CalibrationOptions):
    """``gptq``: int4 by GPTQ (Frantar et al. 2022) on the calibration text's inputs."""

    # dampening added to the Hessian's diagonal, as a fraction of its mean (GPTQ: 0.01)
    damp: float = Field(0.01, gt=0.0, le=1.0)
    block_size: int = Field(128, ge=1)  # columns per lazy batch update
    # quantize columns in order of decreasing Hessian diagonal (the paper's "act-order");
    # groups stay contiguous column ranges for the kernel, their scales taken up front
    act_order: bool = False
    # calibrate block by block ("layers.<i>." names), each on the inputs it gets with the
    # blocks before it already quantized (the paper's order); False: every projection on
    # the float model's inputs, all in one pass
    sequential: bool = False


class AWQConfig(Int4Config, CalibrationOptions):
    """``awq``: int4 after activation-aware channel scaling (Lin et al. 2023)."""

    grid: int = Field(20, ge=1)  # exponents tried: 0, 1/grid, ..., (grid - 1)/grid
    clip: bool = True  # also search a per-group range shrink (AWQ's auto-clip)
    clip_grid: int = Field(20, ge=1)  # shrink steps of 1/clip_grid ...
    max_shrink: float = Field(0.5, ge=0.0, lt=1.0)  # ... down to (1 - max_shrink) of the range


class SmoothQuantConfig(QuantizationConfig, CalibrationOptions):
    """``smoothquant``: W8A8 (Xiao et al. 2022) through ``torch._int_mm``."""

    # the W8A8 product is the large-M path; it needs no float weight
    dense_min_rows: int | None = Field(None, ge=2)
    # migration strength: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (0.8 for Llama)
    alpha: float = Field(0.8, ge=0.0, le=1.0)
    # rows from which activations are quantized per token and multiplied through
    # torch._int_mm; fewer rows use the weight-only int8 kernel on the same int8 weight
    w8a8_min_rows: int = Field(16, ge=1)
