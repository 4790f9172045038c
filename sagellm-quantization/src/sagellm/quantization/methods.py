"""Linear methods on torch's CPU weight-only kernels (``sagellm.core.protocols.LinearMethod``).

The int4 and int8 kernels are small-M kernels: they stream 4-bit or 8-bit weights and
beat a bf16 matrix product up to a handful of rows, then lose to it (measured on the
embedded model's 121 projections, 2 threads, bf16: int4 4.6 ms vs bf16 22 ms at 1 row,
20.5 vs 21.7 ms at 16, 80 vs 53 ms at 64). A method given ``dense_min_rows`` keeps the
layer's float weight and uses it from that many rows on, so batched decode and prefill
never get slower; ``dense_min_rows=None`` drops the float weight (less memory, and every
batch size on the quantized kernel).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.core.types import PackedWeight
from sagellm.quantization.formats import (
    INT4_GROUP_SIZES,
    decode_blocks,
    int4_from_gguf,
    int4_rtn,
    int8_rtn,
    pack_int4,
    q8_0_values,
)

__all__ = ["Int4Method", "Int8Method"]


def _float_weight(layer: nn.Module) -> torch.Tensor:
    w = getattr(layer, "weight", None)
    if w is None:
        raise ValueError(f"{type(layer).__name__} has no float weight to quantize")
    return w


def _keep_or_drop_dense(layer: nn.Module, dense_min_rows: int | None) -> None:
    if dense_min_rows is None:
        layer.weight = None


class _WeightOnlyMethod:
    """Shared: the dense fallback from ``dense_min_rows`` rows on."""

    name = "weight_only"

    def __init__(self, dense_min_rows: int | None) -> None:
        if dense_min_rows is not None and dense_min_rows < 2:
            raise ValueError("dense_min_rows must be at least 2 (or None: never dense)")
        self.dense_min_rows = dense_min_rows

    def _dense(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        m = self.dense_min_rows
        if m is not None and x.shape[0] >= m:
            return F.linear(x, layer.weight, layer.bias)
        return None


class Int4Method(_WeightOnlyMethod):
    """4-bit weights, one scale and zero per ``group_size`` input columns.

    From a layer's ``packed`` Q4_0/Q4_1 blocks (``from_gguf=True``: exact, group 32) or by
    round-to-nearest of its float weight; ``qweights`` may hand over values computed by a
    calibrating quantizer (GPTQ, AWQ) as ``(q, scale, zero)``.
    """

    def __init__(
        self,
        group_size: int = 32,
        *,
        dense_min_rows: int | None = 16,
        from_gguf: bool = False,
        qweights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(dense_min_rows)
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"int4 group size {group_size} is not one the CPU kernel takes: "
                f"{', '.join(map(str, INT4_GROUP_SIZES))}"
            )
        self.group_size = group_size
        self.from_gguf = from_gguf
        self.qweights = qweights
        self.name = name or (f"gguf_int4_g{group_size}" if from_gguf else f"int4_g{group_size}")

    def process_weights(self, layer: nn.Module) -> None:
        """Pack the layer's weight for ``_weight_int4pack_mm_for_cpu``."""
        w = _float_weight(layer)
        n, k = w.shape
        if k % self.group_size:
            fits = ", ".join(str(g) for g in INT4_GROUP_SIZES if k % g == 0) or "none"
            raise ValueError(
                f"int4 group size {self.group_size} does not divide the {k} input columns of "
                f"a {n}x{k} projection; use a group size that does ({fits})"
            )
        if self.qweights is not None:
            q, scale, zero = self.qweights
        elif self.from_gguf:
            packed: PackedWeight | None = getattr(layer, "packed", None)
            if packed is None or packed.format not in ("q4_0", "q4_1"):
                fmt = packed.format if packed is not None else "none"
                raise ValueError(f"from_gguf needs q4_0/q4_1 blocks on the layer, found {fmt}")
            q, scale, zero = int4_from_gguf(packed.format, packed.data, packed.shape)
        else:
            q, scale, zero = int4_rtn(w, self.group_size)
        qweight, scale_zeros = pack_int4(q, scale, zero, w.dtype)
        layer.register_buffer("qweight", qweight.to(w.device), persistent=False)
        layer.register_buffer("scale_zeros", scale_zeros.to(w.device), persistent=False)
        self.qweights = None  # one method object serves one layer's hand-over only
        _keep_or_drop_dense(layer, self.dense_min_rows)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The int4 kernel below ``dense_min_rows`` rows, the float weight from there."""
        y = self._dense(layer, x)
        if y is not None:
            return y
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, layer.qweight, self.group_size, layer.scale_zeros
        )
        if layer.bias is not None:
            y = y + layer.bias
        return y


class Int8Method(_WeightOnlyMethod):
    """8-bit weights with one scale per output row, or per row and ``group_size`` columns.

    ``_weight_int8pack_mm`` takes one scale per row; a grouped weight runs it once per
    column group (each group's scales are that group's per-row scales) and sums, reading
    the same bytes. From the float weight (round-to-nearest), or from a layer's Q8_0
    blocks (``from_gguf=True``): with ``group_size=32`` those are used exactly as stored
    (measured on the embedded model's head: 1.5 ms per token against 0.9 ms per-row and
    4.2 ms in bf16), per row they are re-rounded onto one scale per row.
    """

    def __init__(
        self,
        group_size: int | None = None,
        *,
        dense_min_rows: int | None = 16,
        from_gguf: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(dense_min_rows)
        if group_size is not None and (group_size < 16 or group_size % 16):
            raise ValueError(f"int8 group size must be a multiple of 16, got {group_size}")
        self.group_size = group_size
        self.from_gguf = from_gguf
        suffix = f"_g{group_size}" if group_size else ""
        self.name = name or (f"gguf_int8{suffix}" if from_gguf else f"int8{suffix}")

    def process_weights(self, layer: nn.Module) -> None:
        """Quantize the layer's weight to int8 with per-row (per-group) scales."""
        w = _float_weight(layer)
        n, k = w.shape
        src = w
        packed: PackedWeight | None = getattr(layer, "packed", None)
        if self.from_gguf and packed is not None:
            if packed.format == "q8_0" and self.group_size == 32:
                q, d = q8_0_values(packed.data, packed.shape)
                self._register(layer, q, d, w)
                return
            src = decode_blocks(packed.format, packed.data, packed.shape)
        g = self.group_size or k
        if k % g:
            raise ValueError(f"int8 group size {g} does not divide the {k} input columns")
        q, scale = int8_rtn(src.reshape(n * (k // g), g))
        self._register(layer, q.reshape(n, k), scale.reshape(n, k // g), w)

    def _register(
        self, layer: nn.Module, q: torch.Tensor, scale: torch.Tensor, w: torch.Tensor
    ) -> None:
        n, k = q.shape
        groups = scale.shape[1]
        # [groups, N, g]: each group's rows contiguous for the kernel
        qg = q.reshape(n, groups, k // groups).transpose(0, 1).contiguous()
        layer.register_buffer("qweight", qg.to(w.device), persistent=False)
        layer.register_buffer(
            "scales", scale.t().contiguous().to(w.device, w.dtype), persistent=False
        )
        _keep_or_drop_dense(layer, self.dense_min_rows)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The int8 kernel below ``dense_min_rows`` rows, the float weight from there."""
        y = self._dense(layer, x)
        if y is not None:
            return y
        qw, sc = layer.qweight, layer.scales
        groups = qw.shape[0]
        if groups == 1:
            y = torch.ops.aten._weight_int8pack_mm(x, qw[0], sc[0])
        else:
            g = qw.shape[2]
            acc = torch.ops.aten._weight_int8pack_mm(x[:, :g], qw[0], sc[0]).float()
            for i in range(1, groups):
                acc += torch.ops.aten._weight_int8pack_mm(x[:, i * g : (i + 1) * g], qw[i], sc[i])
            y = acc.to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias
        return y
