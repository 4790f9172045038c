"""Configuration of the native runtime."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["NativeRuntimeConfig"]


class NativeRuntimeConfig(BaseModel):
    """What the native runtime loads and how it computes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # embedded model name, .gguf file, or folder with config.json + *.safetensors
    model: str = "smollm2-135m"
    # compute dtype; "auto" is bfloat16 where the CPU has native bf16 matmul (or on CUDA
    # with bf16 support), float32 elsewhere
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "cpu"  # torch device string
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads; None: torch's default
    # longest sequence to serve; None: what the model was trained for
    max_model_len: int | None = Field(None, ge=1)
    # weight quantizer in sagellm.quantization; None: "gguf" for a GGUF checkpoint when
    # installed (its quantized blocks computed on natively), float otherwise; "none":
    # float weights
    quantization: str | None = None
    quantization_options: dict[str, Any] = Field(default_factory=dict)  # the quantizer's
    # KV cache element type: "auto" stores the compute dtype; "int8" (rounded, clamped
    # to +-127), "fp8_e4m3" and "fp8_e5m2" store 1-byte values with a float16 scale per
    # token and KV head, about half the bytes (twice the blocks in the same memory)
    kv_cache_dtype: Literal["auto", "int8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    # kernel provider in sagellm.kernels; None: eager PyTorch
    kernels: str | None = None
    kernel_options: dict[str, Any] = Field(default_factory=dict)  # the provider's
