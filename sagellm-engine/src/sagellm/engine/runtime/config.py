"""Configuration of the native runtime."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["NativeRuntimeConfig", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"wanda,sparsity=0.5,pattern=2:4"`` -> ``("wanda", {"sparsity": 0.5, "pattern": "2:4"})``.

    Values are read as JSON where they parse (numbers, true/false, null), else as text.
    Raises ValueError naming the part that is not ``key=value``.
    """
    name, *pairs = [part.strip() for part in spec.split(",")]
    if not name:
        raise ValueError(f"{spec!r} names no method; write METHOD[,key=value...]")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} of {spec!r} is not key=value")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return name, options


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
    # pruning applied after loading and before quantization: "METHOD[,key=value...]"
    # (METHOD in sagellm.sparsity: magnitude, wanda, sparsegpt, structured); None: dense
    sparsity: str | None = None
    sparsity_options: dict[str, Any] = Field(default_factory=dict)  # merged over the spec's
    # KV cache element type: "auto" stores the compute dtype; "int8" (rounded, clamped
    # to +-127), "fp8_e4m3" and "fp8_e5m2" store 1-byte values with a float16 scale per
    # token and KV head, about half the bytes (twice the blocks in the same memory)
    kv_cache_dtype: Literal["auto", "int8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    # measure, once per machine, model and dtype, from how many rows a quantized layer's
    # float product beats its few-row kernel, and switch there (the quantizers' default
    # is 16 rows; a dense_min_rows in quantization_options turns this off)
    tune_dense_rows: bool = True
    # measure once per machine whether the kernel provider's prefill attention beats
    # SDPA (it does without AMX, SDPA does with it) and attend with the faster
    tune_prefill_attention: bool = True
    # decoder layers left out of the model (indices into the checkpoint's layers): the
    # self-speculative draft of the layer_skip proposer; the KV schema has the kept ones
    skip_layers: tuple[int, ...] = ()
    # kernel provider in sagellm.kernels; None: eager PyTorch
    kernels: str | None = None
    kernel_options: dict[str, Any] = Field(default_factory=dict)  # the provider's
    # tensor parallelism (sagellm.engine.runtime.tensor_parallel): ranks that each hold
    # 1/N of every layer; num_threads is split between them
    tensor_parallel_size: int = Field(1, ge=1)
    tensor_parallel_rank: int = Field(0, ge=0)  # this process's rank (workers: 1..N-1)
    # "spawn": rank 0 starts ranks 1..N-1 on its host; "external": they are started with
    # `sagellm tp-worker` (on other hosts) and meet rank 0 at master_addr:master_port
    tensor_parallel_workers: Literal["spawn", "external"] = "spawn"
    master_addr: str = "127.0.0.1"  # torch.distributed TCP rendezvous of the ranks
    master_port: int = Field(0, ge=0, le=65535)  # 0: rank 0 picks a free port (spawn only)
    comm_backend: str = "torch"  # implementation in sagellm.comm_backend
    comm_options: dict[str, Any] = Field(default_factory=dict)  # its config, e.g. shm off
    tensor_parallel_timeout_s: float = Field(60.0, gt=0.0)  # longest wait in a collective
