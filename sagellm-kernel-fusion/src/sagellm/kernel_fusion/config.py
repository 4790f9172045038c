"""Configuration of sagellm.kernel_fusion."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FusedKernelsConfig"]


class FusedKernelsConfig(BaseModel):
    """Options of the ``fused`` kernel provider."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # rows oneDNN lays its blocked weights out for (any row count is accepted)
    linear_batch_hint: int = Field(64, ge=1)
    # use oneDNN's prepacked weights for float projections
    onednn_linear: bool = True
    # offer the W8A8 int8 product (oneDNN, per-row int8 inputs) for the many-row steps of
    # quantized projections (op ``int8_dense_linear``): faster prefill and batched decode,
    # but the per-row int8 inputs cost the embedded model a mean KL of ~0.04 nats/token
    # (top-1 88%) against ~0.001 in bfloat16, so it is off unless asked for
    int8_dense_linear: bool = False
    # build and use the C++ kernels (paged decode attention); compiled once per machine
    compiled_kernels: bool = True
    # compute GGUF Q4_0/Q4_1/Q8_0 projections on their blocks for few-row steps (needs
    # the compiled kernels); off: the quantizer's own kernel
    gguf_blocks: bool = True
    # the GGUF kernel's input rounding: 16 bits (near float32) or 8 (GGUF's own, faster)
    gguf_input_bits: Literal[8, 16] = 16
    # causal attention of multi-token chunks (prefill) in the compiled flash kernel
    # (bfloat16 where the CPU has AVX512-BF16, float32 where it has AVX2); off: torch's SDPA
    prefill_attention: bool = True
    # run every decoder layer of a few-row decode step in one C++ call when the model's
    # projections all compute on GGUF blocks (needs gguf_blocks); off: layer by layer
    decode_step: bool = True
