"""A projection whose weight may be several projections stacked row-wise.

The layer owns shapes; a method object (:class:`sagellm.core.protocols.LinearMethod`)
owns the bytes and the kernel (vLLM's linear-method pattern). Every projection starts
with :data:`DENSE`, the float matmul; a quantizer swaps in its own method after loading,
so quantization, fused kernels and sharding compose on this one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import PackedWeight

__all__ = ["DENSE", "DenseMethod", "Linear", "linear"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through a matrix-vector product when ``x`` is a single row.

    On CPU a bf16 one-row product runs 1.3-1.9x faster as ``mv`` than as ``mm`` (it
    streams the weight at ~20-30 GB/s instead of ~15); batch-1 decode is exactly that.
    """
    if x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu":
        y = torch.mv(weight, x[0])
        if bias is not None:
            y = y + bias
        return y.unsqueeze(0)
    return F.linear(x, weight, bias)


class DenseMethod:
    """The float method: the weight as loaded, one (matrix-vector) product per call."""

    name = "dense"

    def process_weights(self, layer: nn.Module) -> None:
        """Nothing to convert: the float weight is used as it is."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)`` in ``x``'s dtype."""
        return linear(x, cast(torch.Tensor, layer.weight), cast("torch.Tensor | None", layer.bias))


#: The method every projection starts with.
DENSE = DenseMethod()


class Linear(nn.Module):
    """``y = x @ W.T (+ b)``; ``output_sizes`` names the stacked parts (q, k, v or gate, up).

    Stacking projections that read the same input turns three (or two) matrix products
    into one, which matters most for small batches where each call's overhead and each
    pass over the input count. ``packed`` keeps the checkpoint's quantized blocks (GGUF)
    for a method that computes on them; it is dropped once the method has processed them.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], *, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = tuple(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.weight: Any = nn.Parameter(
            torch.empty(self.output_size, input_size), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(self.output_size), requires_grad=False) if bias else None
        )
        self.packed: PackedWeight | None = None
        self.method: LinearMethod = DENSE  # what forward computes with
        self.dense: LinearMethod = DENSE  # the float method (a quantized method's fallback)
        # a kernel provider's method on ``packed`` as stored, offered to the quantizer
        self.block_method: LinearMethod | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def set_method(self, method: LinearMethod) -> None:
        """Convert the loaded weight for ``method`` and compute through it from now on."""
        method.process_weights(self)
        self.method = method
        self.packed = None

    def set_dense(self, method: LinearMethod) -> None:
        """Make ``method`` (a kernel provider's float matmul) the layer's float method.

        It is what a quantized method falls back to for large inputs, and what the layer
        computes with when it has no quantized method. Call after :meth:`set_method`.
        """
        method.process_weights(self)
        if self.method is self.dense:
            self.method = method
        self.dense = method

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, method={self.method.name}"

    def load_parts(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor] | None = None,
        packed: Sequence[PackedWeight | None] | None = None,
    ) -> None:
        """Copy the stacked parts in, in ``output_sizes`` order (shapes are checked).

        ``packed`` gives each part's quantized blocks; they are kept (stacked row-wise)
        only when every part has them in one format.
        """
        if len(weights) != len(self.output_sizes):
            raise ValueError(f"expected {len(self.output_sizes)} weights, got {len(weights)}")
        row = 0
        for w, size in zip(weights, self.output_sizes):
            if tuple(w.shape) != (size, self.input_size):
                raise ValueError(
                    f"weight of shape {tuple(w.shape)} does not fit ({size}, {self.input_size})"
                )
            self.weight.data[row : row + size].copy_(w)
            row += size
        if self.bias is not None:
            if biases is None or len(biases) != len(self.output_sizes):
                raise ValueError("this projection has a bias: give one bias per part")
            row = 0
            for b, size in zip(biases, self.output_sizes):
                self.bias.data[row : row + size].copy_(b.reshape(size))
                row += size
        self.packed = _stack_packed(packed) if packed else None


def _stack_packed(parts: Sequence[PackedWeight | None]) -> PackedWeight | None:
    if any(p is None for p in parts):
        return None
    ps = [p for p in parts if p is not None]
    if len({p.format for p in ps}) != 1 or len({p.shape[1] for p in ps}) != 1:
        return None
    if len(ps) == 1:
        return ps[0]
    data = torch.cat([p.data for p in ps], dim=0)
    return PackedWeight(ps[0].format, data, (sum(p.shape[0] for p in ps), ps[0].shape[1]))
