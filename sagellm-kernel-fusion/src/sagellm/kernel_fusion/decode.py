"""Every decoder layer of a decode step in one C++ call (``csrc/decode_step.cpp``).

At batch 1 a Llama layer is nine small ops, and calling them one module at a time from
Python costs about as much as the products themselves (the embedded model: ~210 module
calls per token). :func:`make_decode_step` takes a model's layers once, at load time,
when each of their projections computes on GGUF blocks through :class:`GGUFBlockLinear`
(directly, or as a quantizer's few-row kernel); :class:`FusedDecodeStep` then runs all
layers of a step in C++ with the GIL released. A quantizer's method that switches to
another product from ``dense_min_rows`` rows on (oneDNN's blocked weight, a plain
``F.linear`` weight, or the W8A8 int8 product of :class:`~.onednn.OneDNNInt8Linear`)
switches at the same row count inside the step, so batched decode steps run there too. The ops and their order are those of the engine's layers, so the
result is bitwise the layer-by-layer one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from sagellm.kernel_fusion.extension import load_kernels
from sagellm.kernel_fusion.gguf import GGUFBlockLinear

__all__ = ["PROJECTIONS", "FusedDecodeStep", "make_decode_step"]

logger = logging.getLogger(__name__)

#: The projections of a layer spec, in the order the layer applies them.
PROJECTIONS = ("qkv", "o", "gate_up", "down")

#: ``(codes, d, c, bits, bias, dense weight, dense kind, dense_min_rows, dense scales)`` of
#: a projection (the scales: those of a W8A8 dense weight, else None).
_Operands = tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    int,
    "torch.Tensor | None",
    "torch.Tensor | None",
    int,
    int,
    "torch.Tensor | None",
]

#: How a projection multiplies from ``dense_min_rows`` on (``DenseKind`` in decode_step.cpp).
NO_DENSE, DENSE_ONEDNN, DENSE_LINEAR, DENSE_INT8 = 0, 1, 2, 3
_NEVER = 2**62  # dense_min_rows of a projection that never switches


def _dense_operand(
    linear: nn.Module, dense_min_rows: int
) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
    """``(weight, kind, scales)`` of the product a quantizer's method switches to from
    ``dense_min_rows`` rows on (as ``_WeightOnlyMethod._dense`` chooses it): kind
    :data:`DENSE_ONEDNN` for a oneDNN blocked weight, :data:`DENSE_LINEAR` for a plain one,
    :data:`DENSE_INT8` for a W8A8 weight (with its per-channel scales);
    ``(None, NO_DENSE, None)`` when the switch leads back to the blocks (the float weight
    dropped); raises LookupError for a float method the step does not run."""
    dense = getattr(linear, "dense", None)
    weight = getattr(linear, "weight", None)
    name = getattr(dense, "name", None)
    if name == "onednn_int8":
        return (
            cast(torch.Tensor, linear.int8_weight),
            DENSE_INT8,
            cast(torch.Tensor, linear.int8_scales),
        )
    if weight is None and (dense is None or name == "dense"):
        return None, NO_DENSE, None  # the method computes on its blocks at every row count
    if name == "onednn":
        return cast(torch.Tensor, linear.onednn_weight), DENSE_ONEDNN, None
    if (dense is None or name == "dense") and isinstance(weight, torch.Tensor):
        return weight, DENSE_LINEAR, None
    raise LookupError(f"its float method {name!r} from {dense_min_rows} rows on")


def _block_operands(linear: nn.Module) -> tuple[_Operands, int, int] | str:
    """``(operands, input_bits, rows)`` of a projection computing on GGUF blocks (and, from
    its ``dense_min_rows`` on, on a float weight the step can also run), or why it does
    not; ``rows``: the step covers fewer rows than this for the projection."""
    method = getattr(linear, "method", None)
    wrapped = getattr(method, "blocks", None)
    blocks: GGUFBlockLinear
    dense: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    kind, dense_min_rows, rows = NO_DENSE, _NEVER, sys.maxsize
    if isinstance(method, GGUFBlockLinear):
        blocks = method
    elif isinstance(wrapped, GGUFBlockLinear):
        # a quantizer's method hands the steps below dense_min_rows rows to its blocks
        blocks = wrapped
        found = getattr(method, "dense_min_rows", None)
        if found is not None:
            try:
                dense, kind, scales = _dense_operand(linear, int(found))
            except LookupError:
                rows = int(found)  # the step stops where the method leaves its blocks
            else:
                dense_min_rows = int(found) if dense is not None else _NEVER
    else:
        return f"its method {getattr(method, 'name', method)!r} does not compute on GGUF blocks"
    if getattr(linear, "input_scale", None) is not None:
        return "it scales its input before the product"
    bias = getattr(linear, "bias", None)
    operands: _Operands = (
        cast(torch.Tensor, linear.block_codes),
        cast(torch.Tensor, linear.block_scales),
        cast(torch.Tensor, linear.block_terms),
        int(blocks.bits),
        bias if isinstance(bias, torch.Tensor) else None,
        dense,
        kind,
        dense_min_rows,
        scales,
    )
    return operands, blocks.input_bits, rows


class FusedDecodeStep:
    """All decoder layers of a decode step of fewer than :attr:`max_rows` rows in one call
    (``sys.maxsize`` when every projection runs at every row count).

    Built by :func:`make_decode_step`; call with the embeddings ``hidden [T, E]``,
    ``positions`` and ``slots`` int64 ``[T]``, the per-layer ``(k_cache, v_cache)`` pairs,
    ``block_tables`` int32 ``[T, width]``, ``context_lens`` int32 ``[T]`` and the float32
    rotary ``cos``/``sin`` tables; returns the last layer's ``(hidden, residual)``.
    """

    def __init__(self, step: Any, max_rows: int) -> None:
        self._step = step
        self.max_rows = max_rows  # steps of fewer rows than this run here
        self.num_layers = int(step.num_layers)

    def __call__(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.shape[0] >= self.max_rows:
            raise ValueError(
                f"a step of {hidden.shape[0]} rows is not a fused decode step "
                f"(fewer than {self.max_rows})"
            )
        h, r = self._step.forward(
            hidden,
            positions,
            slots,
            [k for k, _ in kv_caches],
            [v for _, v in kv_caches],
            block_tables,
            context_lens,
            cos,
            sin,
        )
        return h, r


def make_decode_step(
    layers: Sequence[Mapping[str, Any]],
    *,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> FusedDecodeStep | None:
    """A :class:`FusedDecodeStep` over ``layers``, or None (logged once) when a projection
    does not compute on GGUF blocks or the kernels are not built.

    Each layer spec maps ``input_norm`` and ``post_norm`` to the norms' weights,
    ``num_heads`` to its query heads, and ``qkv``, ``o``, ``gate_up``, ``down`` to its
    projection modules (stacked q/k/v and gate/up, as the engine's ``Linear`` holds them).
    """
    module = load_kernels()
    if module is None or not layers:
        return None
    step: Any = None
    input_bits: int | None = None
    max_rows = sys.maxsize
    for i, spec in enumerate(layers):
        projections = []
        for name in PROJECTIONS:
            found = _block_operands(spec[name])
            if isinstance(found, str):
                logger.info("fused decode step not used: layers.%d.%s: %s", i, name, found)
                return None
            operands, bits, rows = found
            if input_bits is None:
                input_bits = bits
                step = module.DecodeStep(num_kv_heads, head_dim, eps, bits, head_dim**-0.5)
            elif bits != input_bits:
                logger.info("fused decode step not used: projections round inputs differently")
                return None
            max_rows = min(max_rows, rows)
            projections.append(operands)
        step.add_layer(spec["input_norm"], spec["post_norm"], int(spec["num_heads"]), projections)
    return FusedDecodeStep(step, max_rows)
