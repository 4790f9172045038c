"""Linear methods on torch's CPU weight-only kernels (``sagellm.core.protocols.LinearMethod``).

The int4 and int8 kernels are small-M kernels: they stream 4-bit or 8-bit weights and
beat a bf16 matrix product up to a handful of rows, then lose to it (measured on the
embedded model's 121 projections, 2 threads, bf16: int4 4.6 ms vs bf16 22 ms at 1 row,
20.5 vs 21.7 ms at 16, 80 vs 53 ms at 64). A method given ``dense_min_rows`` keeps the
layer's float weight and uses it from that many rows on, so batched decode and prefill
never get slower; ``dense_min_rows=None`` drops the float weight (less memory, and every
batch size on the quantized kernel).

The kernels are vectorised for bf16 only: with float32 inputs they run scalar loops
(measured on a 3072x576 projection, one thread: int4 11 ms against 3.3 ms for a float32
product at one row, 590 against 13 ms at 64 rows; int8 1.6 against 3.3 ms at one row, 122
against 13 ms at 64). A float32 layer therefore computes on the float32 values of its
quantized weight (``dequantized``: the same numbers the kernel would use, without its
memory saving), except int8 at one row, where the kernel is faster.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import PackedWeight
from sagellm.quantization.formats import (
    INT4_GROUP_SIZES,
    decode_blocks,
    int4_from_gguf,
    int4_levels,
    int4_rtn,
    int8_rtn,
    pack_int4,
    q8_0_values,
    unpack_int4,
)

__all__ = ["Int4Method", "Int8Method", "ScaledInt4Method", "buffer", "input_size"]


def buffer(layer: nn.Module, name: str) -> torch.Tensor:
    """The tensor a method registered on ``layer`` as ``name`` (typed for mypy)."""
    return cast(torch.Tensor, getattr(layer, name))


def input_size(layer: nn.Module) -> int:
    """A projection's ``input_size``."""
    return int(cast(int, layer.input_size))


def _float_weight(layer: nn.Module) -> torch.Tensor:
    w = getattr(layer, "weight", None)
    if w is None:
        raise ValueError(f"{type(layer).__name__} has no float weight to quantize")
    return w


def _keep_or_drop_dense(layer: nn.Module, dense_min_rows: int | None) -> None:
    if dense_min_rows is None:
        layer.register_parameter("weight", None)


class _WeightOnlyMethod:
    """Shared: the dense fallback from ``dense_min_rows`` rows on."""

    name = "weight_only"

    def __init__(self, dense_min_rows: int | None) -> None:
        if dense_min_rows is not None and dense_min_rows < 2:
            raise ValueError("dense_min_rows must be at least 2 (or None: never dense)")
        self.dense_min_rows = dense_min_rows
        self.blocks: LinearMethod | None = None

    def _take_blocks(self, layer: nn.Module) -> bool:
        """Give the layer's GGUF blocks to its ``block_method``, if it was given one.

        A kernel provider's method that computes on the blocks themselves (the engine sets
        ``layer.block_method`` before quantizing); the numbers are the checkpoint's, so
        it replaces this method's own kernel and its buffers. False: no block method.
        """
        method: LinearMethod | None = getattr(layer, "block_method", None)
        if method is None or getattr(layer, "packed", None) is None:
            return False
        method.process_weights(layer)
        self.blocks = method
        self.name = f"{self.name}+{method.name}"
        return True

    def _dense(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        m = self.dense_min_rows
        if m is not None and x.shape[0] >= m:
            # the layer's own float method where it has one (a kernel provider may have
            # given it a faster one than F.linear)
            dense = getattr(layer, "dense", None)
            if getattr(layer, "weight", None) is None and (dense is None or dense.name == "dense"):
                return None  # the float weight was dropped since (a tied table gone)
            if dense is not None:
                y: torch.Tensor = dense.apply(layer, x)
                return y
            return F.linear(
                x, cast(torch.Tensor, layer.weight), cast("torch.Tensor | None", layer.bias)
            )
        return None


class Int4Method(_WeightOnlyMethod):
    """4-bit weights, one scale and zero per ``group_size`` input columns.

    From a layer's ``packed`` Q4_0/Q4_1 blocks (``from_gguf=True``: exact, group 32) or by
    round-to-nearest of its float weight (``bits`` codes, asymmetric unless
    ``symmetric``); ``qweights`` may hand over values computed by a calibrating quantizer
    (GPTQ, AWQ) as ``(q, scale, zero)``: ``q`` int ``[N, K]`` in 0..15, ``scale`` and
    ``zero`` ``[N, K / group_size]``, ``w = (q - 8) * scale + zero``.
    """

    def __init__(
        self,
        group_size: int = 32,
        *,
        dense_min_rows: int | None = 16,
        from_gguf: bool = False,
        qweights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        bits: int = 4,
        symmetric: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(dense_min_rows)
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"int4 group size {group_size} is not one the CPU kernel takes: "
                f"{', '.join(map(str, INT4_GROUP_SIZES))}"
            )
        int4_levels(bits, symmetric)  # validates bits
        self.group_size = group_size
        self.from_gguf = from_gguf
        self.qweights = qweights
        self.bits = bits
        self.symmetric = symmetric
        kind = f"int{bits}{'s' if symmetric else ''}_g{group_size}"
        self.name = name or (f"gguf_int4_g{group_size}" if from_gguf else kind)

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
        if n % 16:
            raise ValueError(
                f"the int4 kernel packs output rows in multiples of 16; a {n}x{k} "
                "projection does not fit it"
            )
        if self.qweights is not None:
            q, scale, zero = self.qweights
            if tuple(q.shape) != (n, k) or tuple(scale.shape) != (n, k // self.group_size):
                raise ValueError(
                    f"handed-over int4 values of shape {list(q.shape)} / {list(scale.shape)} "
                    f"do not fit a {n}x{k} projection at group {self.group_size}"
                )
            q = q.to(torch.int32)
        elif self.from_gguf:
            packed: PackedWeight | None = getattr(layer, "packed", None)
            if packed is None or packed.format not in ("q4_0", "q4_1"):
                fmt = packed.format if packed is not None else "none"
                raise ValueError(f"from_gguf needs q4_0/q4_1 blocks on the layer, found {fmt}")
            if self._take_blocks(layer):
                _keep_or_drop_dense(layer, self.dense_min_rows)
                return
            q, scale, zero = int4_from_gguf(packed.format, packed.data, packed.shape)
        else:
            q, scale, zero = int4_rtn(w, self.group_size, bits=self.bits, symmetric=self.symmetric)
        if w.dtype == torch.float32:
            deq = unpack_int4(q, scale, zero)
            layer.register_buffer("dequantized", deq.to(w.device), persistent=False)
        else:
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
        return self._int4(layer, x)

    def _int4(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:
            return self.blocks.apply(layer, x)
        deq = getattr(layer, "dequantized", None)
        if deq is not None:  # a float32 layer (see the module docstring)
            return F.linear(x, deq, cast("torch.Tensor | None", layer.bias))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, buffer(layer, "qweight"), self.group_size, buffer(layer, "scale_zeros")
        )
        if layer.bias is not None:
            y = y + layer.bias
        return y


class ScaledInt4Method(Int4Method):
    """int4 weights of ``W * diag(s)`` applied to ``x / s`` (AWQ's channel scaling).

    ``input_scale`` is ``1 / s`` (float ``[K]``); the product is the layer's own up to
    quantization. The float fallback from ``dense_min_rows`` rows uses the unscaled float
    weight on ``x`` itself. (Folding ``1 / s`` into a preceding norm would save the
    multiply, but that needs the model's structure; a projection only sees its input.)
    """

    def __init__(
        self,
        group_size: int,
        *,
        input_scale: torch.Tensor,
        qweights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        dense_min_rows: int | None = 16,
        bits: int = 4,
        symmetric: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(
            group_size,
            dense_min_rows=dense_min_rows,
            qweights=qweights,
            bits=bits,
            symmetric=symmetric,
            name=name,
        )
        self.input_scale = input_scale

    def process_weights(self, layer: nn.Module) -> None:
        """Pack the scaled weight; register ``1 / s`` in the layer's dtype."""
        w = _float_weight(layer)
        k = w.shape[1]
        if tuple(self.input_scale.shape) != (k,):
            raise ValueError(
                f"an input scale of shape {list(self.input_scale.shape)} does not fit the "
                f"{k} input columns"
            )
        dtype, device = w.dtype, w.device
        super().process_weights(layer)
        layer.register_buffer("input_scale", self.input_scale.to(device, dtype), persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The int4 kernel on ``x / s`` below ``dense_min_rows`` rows, else the float weight."""
        y = self._dense(layer, x)
        if y is not None:
            return y
        return self._int4(layer, x * buffer(layer, "input_scale"))


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
                if self._take_blocks(layer):
                    _keep_or_drop_dense(layer, self.dense_min_rows)
                    return
                q, d = q8_0_values(packed.data, packed.shape)
                self._register(layer, q, d, w)
                return
            src = decode_blocks(packed.format, packed.data, packed.shape)
        g = self.group_size or k
        if k % g:
            raise ValueError(f"int8 group size {g} does not divide the {k} input columns")
        if g % 16:
            # the kernel reads 16 columns at a time (it crashes on other widths)
            raise ValueError(
                f"the int8 kernel needs a multiple of 16 input columns per scale; a {n}x{k} "
                "projection does not fit it"
            )
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
        if w.dtype == torch.float32:
            deq = q.float().reshape(n, groups, k // groups) * scale.float().unsqueeze(-1)
            layer.register_buffer("dequantized", deq.reshape(n, k).to(w.device), persistent=False)
        _keep_or_drop_dense(layer, self.dense_min_rows)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The int8 kernel below ``dense_min_rows`` rows, the float weight from there."""
        y = self._dense(layer, x)
        if y is not None:
            return y
        if self.blocks is not None:
            return self.blocks.apply(layer, x)
        deq = getattr(layer, "dequantized", None)
        if deq is not None and x.shape[0] > 1:  # a float32 layer (see the module docstring)
            return F.linear(x, deq, cast("torch.Tensor | None", layer.bias))
        qw, sc = buffer(layer, "qweight"), buffer(layer, "scales")
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
