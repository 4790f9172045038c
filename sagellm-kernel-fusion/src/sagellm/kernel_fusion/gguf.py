"""Projections computed on their GGUF blocks (Q4_0, Q4_1, Q8_0) by the package's C++ kernel.

:class:`GGUFBlockLinear` is a :class:`~sagellm.core.protocols.LinearMethod` for the few-row
steps of decoding: its ``process_weights`` takes the layer's ``packed`` blocks (a
:class:`~sagellm.core.types.PackedWeight`) into the kernel's layout (4-bit codes as
stored, float16 block scales and constant terms as stored), and ``apply`` rounds the input rows onto
integers in blocks of 32 and takes integer dot products (``csrc/gguf_linear.cpp``). The
weights are the checkpoint's own; the input's rounding is the only other error:
``input_bits=16`` (the default) keeps it near float32's, ``input_bits=8`` is GGUF's own CPU
rounding (one int8 per value; faster, and on the embedded model a mean KL of 0.012 nats
per token against float32 with 92% top-1 agreement, measured by
``python -m sagellm.engine.quant_eval --dtype float32 --max-tokens 384 gguf``).

Quantizers hand a layer's small-row steps to it through the layer's ``block_method``
(see ``sagellm.quantization.methods``); large steps stay on the dense float path, where a
matrix product beats integer dot products.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from sagellm.core.types import PackedWeight
from sagellm.kernel_fusion.extension import load_kernels

__all__ = ["BLOCK_FORMATS", "GGUFBlockLinear", "repack_blocks"]

#: GGUF block formats the kernel computes on, with (bytes per block of 32, code bits).
BLOCK_FORMATS: dict[str, tuple[int, int]] = {"q4_0": (18, 4), "q4_1": (20, 4), "q8_0": (34, 8)}


def _half(raw: torch.Tensor) -> torch.Tensor:
    """float16 of little-endian float16 byte pairs ``raw [..., 2]``."""
    return raw.contiguous().view(torch.float16).squeeze(-1)


def repack_blocks(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(codes, d, c, bits)`` of a GGUF weight for :func:`gguf_linear`.

    ``codes``: uint8 ``[N, K/2]`` (4-bit, each block's 16 bytes as stored) or int8
    ``[N, K]``; ``d`` and ``c``: float16 ``[N, K/32]`` as the blocks store them (``c``
    empty for Q8_0; Q4_0's ``-8 d`` is exact in float16). Raises ValueError for another
    format or blocks that do not fit ``packed.shape``.
    """
    fmt = packed.format
    if fmt not in BLOCK_FORMATS:
        raise ValueError(
            f"GGUF {fmt} blocks have no block kernel; formats: {', '.join(BLOCK_FORMATS)}"
        )
    size, bits = BLOCK_FORMATS[fmt]
    n, k = packed.shape
    data = packed.data
    if k % 32 or tuple(data.shape) != (n, k // 32 * size) or data.dtype != torch.uint8:
        raise ValueError(
            f"{fmt} blocks of shape {list(data.shape)} ({data.dtype}) do not hold a {n}x{k} "
            f"weight: expected uint8 [{n}, {k // 32 * size}]"
        )
    blocks = data.reshape(n, k // 32, size)
    d = _half(blocks[..., 0:2])
    if fmt == "q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        c = torch.empty(0)
    elif fmt == "q4_1":
        c = _half(blocks[..., 2:4]).contiguous()
        codes = blocks[..., 4:].reshape(n, k // 2).contiguous()
    else:  # q4_0: w = d * (q - 8); -8 d is exact in float16 unless it overflows
        c = (-8.0 * d.float()).half().contiguous()
        if not bool(torch.isfinite(c).all()):
            raise ValueError(
                "q4_0 block scales above 8188 overflow the kernel's float16 terms; "
                "run this weight on the quantizer's own kernel (gguf_blocks off)"
            )
        codes = blocks[..., 2:].reshape(n, k // 2).contiguous()
    return codes, d.contiguous(), c, bits


class GGUFBlockLinear:
    """``x @ W.T (+ b)`` on the layer's GGUF blocks (a LinearMethod; see the module doc)."""

    name = "gguf_blocks"

    def __init__(self, input_bits: int = 16) -> None:
        if input_bits not in (8, 16):
            raise ValueError(f"input_bits must be 8 or 16, got {input_bits}")
        self.input_bits = input_bits
        self._module: Any = load_kernels()
        if self._module is None:
            raise RuntimeError(
                "the GGUF block kernel needs sageLLM's compiled CPU kernels, which could not "
                "be built here (see the log); use the quantizer's own kernel instead"
            )

    def process_weights(self, layer: nn.Module) -> None:
        """Take the layer's ``packed`` blocks into the kernel's layout."""
        packed: PackedWeight | None = getattr(layer, "packed", None)
        if packed is None:
            raise ValueError("GGUFBlockLinear needs the layer's GGUF blocks (layer.packed)")
        codes, d, c, bits = repack_blocks(packed)
        layer.register_buffer("block_codes", codes, persistent=False)
        layer.register_buffer("block_scales", d, persistent=False)
        layer.register_buffer("block_terms", c, persistent=False)
        self.bits = bits

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The product for ``x [..., K]`` (float32 or bfloat16)."""
        shape = x.shape
        y = cast(
            torch.Tensor,
            self._module.gguf_linear(
                x.reshape(-1, shape[-1]),
                layer.block_codes,
                layer.block_scales,
                layer.block_terms,
                self.bits,
                self.input_bits,
            ),
        )
        bias = getattr(layer, "bias", None)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])
