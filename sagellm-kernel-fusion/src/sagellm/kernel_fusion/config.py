"""Configuration of sagellm.kernel_fusion."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FusedKernelsConfig"]


class FusedKernelsConfig(BaseModel):
    """Options of the ``fused`` kernel provider."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # rows oneDNN lays its blocked weights out for (any row count is accepted)
    linear_batch_hint: int = Field(64, ge=1)
    # use oneDNN's prepacked weights for float projections
    onednn_linear: bool = True
    # build and use the C++ kernels (paged decode attention); compiled once per machine
    compiled_kernels: bool = True
