"""``fused``: the kernel provider the engine uses by default on CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from sagellm.kernel_fusion.config import FusedKernelsConfig
from sagellm.kernel_fusion.decode import make_decode_step
from sagellm.kernel_fusion.extension import load_kernels
from sagellm.kernel_fusion.gguf import BLOCK_FORMATS, GGUFBlockLinear
from sagellm.kernel_fusion.onednn import (
    OneDNNInt8Linear,
    OneDNNLinear,
    int8_linear_available,
    onednn_available,
)

__all__ = ["FusedKernels"]


def _prefill_kernel_here() -> bool:
    """Whether the compiled prefill attention runs on this CPU (bfloat16 with AVX512-BF16,
    float32 with AVX2)."""
    module = load_kernels()
    return module is not None and any(
        module.prefill_attention_supported(dtype, 64) for dtype in (torch.bfloat16, torch.float32)
    )


class FusedKernels:
    """Fused and prepacked CPU kernels (implements ``sagellm.core.protocols.KernelProvider``).

    Ops:

    * ``dense_linear``: a factory ``(dtype) -> LinearMethod | None`` of float projections on
      oneDNN's prepacked weights (:mod:`.onednn`);
    * ``int8_dense_linear``: a factory ``(dtype) -> LinearMethod | None`` of W8A8 products
      (int8 weights per output channel, inputs quantized per row, oneDNN's int8 matmul;
      :class:`~.onednn.OneDNNInt8Linear`), for the many-row steps of projections that are
      quantized already (the engine does not use it for a float model);
    * ``paged_decode_attention``: ``(q [B, H, D], k_cache, v_cache [blocks, block_size,
      H_kv, D], block_tables int32 [B, width], context_lens int32 [B], scale) -> [B, H, D]``,
      decode attention reading the pool's blocks in place (C++, :mod:`.extension`);
    * ``prefill_attention``: a factory ``(dtype, head_dim) -> attend | None`` where
      ``attend(q [T, H, D], k, v [S, H_kv, D], out [T, H, D], start, scale)`` writes the
      causal attention of a chunk whose row i sits at position ``start + i`` into ``out``
      (flash-style: bfloat16 with AVX512-BF16, float32 with AVX2; None for a dtype or head
      size it has no kernel for);
    * ``gguf_linear``: a factory ``(format) -> LinearMethod | None`` of projections computed
      on their GGUF Q4_0/Q4_1/Q8_0 blocks with int8-rounded inputs (:mod:`.gguf`), for
      the few-row steps of decoding; None for another format;
    * ``decode_step``: a factory ``(layers, *, num_kv_heads, head_dim, eps) ->
      FusedDecodeStep | None`` that runs every decoder layer of a few-row decode step in
      one C++ call when all projections compute on GGUF blocks (:mod:`.decode`);
    * ``fused_layer_ops``: the compiled module whose ``rms_norm(x, w, eps)``,
      ``add_rms_norm(x, residual, w, eps) -> (out, residual)`` (residual updated in place),
      ``silu_and_mul(x)`` and ``rotary_write_kv(qkv, positions, cos, sin, H, Hkv, k_cache,
      v_cache, slots)`` (q and k rotated in place in ``qkv``, k and v written to their
      slots) each make one pass over memory.

    An op this machine cannot run (no oneDNN, no compiler) is left out of
    :meth:`available_ops`.
    """

    config_class: ClassVar[type[BaseModel]] = FusedKernelsConfig

    def __init__(self, config: FusedKernelsConfig | None = None, **_context: object) -> None:
        self.config = config or FusedKernelsConfig()

    @property
    def fingerprint(self) -> str:
        """Which build of the compiled kernels serves (its module name, a digest of the
        sources, torch, flags and CPU), "" without one: a measured choice made with one
        build (the engine's tuning caches) is not reused with another."""
        module = load_kernels() if self.config.compiled_kernels else None
        return str(getattr(module, "__name__", "")) if module is not None else ""

    def available_ops(self) -> tuple[str, ...]:
        """Names of the ops this machine can run."""
        ops = []
        if self.config.onednn_linear and (
            onednn_available(torch.float32) or onednn_available(torch.bfloat16)
        ):
            ops.append("dense_linear")
        if (
            self.config.int8_dense_linear
            and self.config.compiled_kernels
            and int8_linear_available()
        ):
            ops.append("int8_dense_linear")
        if self.config.compiled_kernels and load_kernels() is not None:
            ops += ["paged_decode_attention", "fused_layer_ops"]
            if self.config.prefill_attention and _prefill_kernel_here():
                ops.append("prefill_attention")
            if self.config.gguf_blocks:
                ops.append("gguf_linear")
                if self.config.decode_step:
                    ops.append("decode_step")
        return tuple(ops)

    def get(self, op: str) -> Any:
        """The callable for ``op``; KeyError naming the available ops otherwise."""
        if op not in self.available_ops():
            raise KeyError(
                f"kernel {op!r} is not provided here; available: {', '.join(self.available_ops())}"
            )
        hint = self.config.linear_batch_hint
        if op == "dense_linear":

            def make(dtype: torch.dtype) -> OneDNNLinear | None:
                return OneDNNLinear(hint) if onednn_available(dtype) else None

            return make
        if op == "int8_dense_linear":

            def make_int8(dtype: torch.dtype) -> OneDNNInt8Linear | None:
                if dtype not in (torch.float32, torch.bfloat16):
                    return None
                return OneDNNInt8Linear(hint)

            return make_int8
        if op == "gguf_linear":

            def make_blocks(fmt: str) -> GGUFBlockLinear | None:
                if fmt not in BLOCK_FORMATS:
                    return None
                return GGUFBlockLinear(self.config.gguf_input_bits)

            return make_blocks
        if op == "prefill_attention":
            compiled: Any = load_kernels()
            assert compiled is not None

            def make_prefill(dtype: torch.dtype, head_dim: int) -> Callable[..., None] | None:
                if not compiled.prefill_attention_supported(dtype, head_dim):
                    return None
                attend: Callable[..., None] = compiled.prefill_attention
                return attend

            return make_prefill
        if op == "decode_step":
            return make_decode_step
        if op == "paged_decode_attention":
            module = load_kernels()
            assert module is not None
            return module.paged_decode_attention
        if op == "fused_layer_ops":
            module = load_kernels()
            assert module is not None
            return module
        raise AssertionError(op)
