"""``gptq``: int4 weights by GPTQ (Frantar et al., arXiv 2210.17323), plain torch.

Per projection GPTQ minimises ``||W X - Q X||^2`` over the calibration inputs ``X``: it
quantizes one input column at a time and spreads that column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian ``H^-1``, ``H = 2 X X^T``
(plus a dampening of the diagonal). As in the reference implementation the update
uses the upper Cholesky factor of ``H^-1`` and is applied lazily: within a block of 128
columns at once, to the rest of the matrix once per block. Scales and zeros are
group-wise in the int4 kernel's ``(q - 8) * scale + zero`` form, taken when the first
column of a group is reached (so they see the error already pushed onto the group);
with ``act_order`` columns go by decreasing ``diag(H)`` and the groups, still contiguous
column ranges for the kernel, take their scales from the weight up front (the
"static groups" of AutoGPTQ).

Every projection is calibrated on the inputs it gets in one float-model pass over the
calibration text (not layer by layer on the already quantized model): one pass, all
Hessians at once (576^2 and 1536^2 floats each here).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, cast

import torch
from pydantic import BaseModel
from torch import nn
from torch.nn import functional as F

from sagellm.core.protocols import LinearMethod
from sagellm.quantization.calibration import (
    LayerStats,
    Tokenize,
    calibrate,
    calibration_sequences,
    collect_stats,
)
from sagellm.quantization.config import GPTQConfig
from sagellm.quantization.formats import int4_levels, int4_params, unpack_int4
from sagellm.quantization.methods import Int4Method, buffer
from sagellm.quantization.rtn import Int4Quantizer, head_method

__all__ = ["GPTQQuantizer", "gptq_quantize"]

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^layers\.(\d+)\.")  # "layers.3.qkv_proj": block 3


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (float64 inside)."""
    h64 = h.double()
    mean_diag = h64.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h64.shape[0], dtype=torch.float64)
    for attempt in range(6):  # a rank-deficient H (few tokens) needs more dampening
        lower, info = torch.linalg.cholesky_ex(h64 + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True).float()
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even dampened")


def gptq_quantize(
    w: torch.Tensor,
    xtx: torch.Tensor,
    group_size: int,
    *,
    bits: int = 4,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes of ``w`` ``[N, K]`` given ``xtx = X^T X`` ``[K, K]`` of its inputs.

    Returns ``(q int32 [N, K], scale [N, K/g], zero [N, K/g])`` (float32),
    ``w ~ (q - 8) * scale + zero``, as :func:`~sagellm.quantization.formats.int4_rtn`.
    Input channels that never saw a non-zero input are quantized as zero weights.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the {k} input columns")
    if tuple(xtx.shape) != (k, k):
        raise ValueError(f"a Hessian of shape {list(xtx.shape)} does not fit {k} input columns")
    int4_levels(bits, symmetric)
    weight = w.detach().float().clone()
    h = xtx.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    num_groups = k // group_size
    scale = torch.zeros(n, num_groups)
    zero = torch.zeros(n, num_groups)
    perm: torch.Tensor | None = None
    if act_order:
        grouped = weight.reshape(n, num_groups, group_size)
        scale, zero = int4_params(grouped, bits, symmetric)
        perm = torch.argsort(h.diagonal(), descending=True)
        weight = weight[:, perm]
        h = h[perm][:, perm]
    u = _inverse_hessian_factor(h, damp)
    order = perm.tolist() if perm is not None else list(range(k))
    lo_code, hi_code = int4_levels(bits, symmetric)
    # the column loop runs K times: per-column work is a handful of [N] vector ops and one
    # rank-1 update of the block's remaining columns
    codes = torch.zeros(k, n)  # column-major while filling
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = weight[:, i1:i2].t().contiguous()  # [cols, N]: a column is a contiguous row
        err1 = torch.zeros(i2 - i1, n)
        u1 = u[i1:i2, i1:i2]
        s_col = z_col = torch.empty(0)
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // group_size
            if perm is None and col % group_size == 0:
                # the group's columns as they are now: this block's part updated by the
                # columns already quantized, a part beyond the block (group > block) not yet
                rest = i1 + i + group_size - i2
                cols = w1[i : i + group_size].t()
                if rest > 0:
                    cols = torch.cat((cols, weight[:, i2 : i2 + rest]), dim=1)
                s, z = int4_params(cols.unsqueeze(1), bits, symmetric)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            if perm is not None or col % group_size == 0:
                s_col, z_col = scale[:, g], zero[:, g]
            wcol = w1[i]
            qc = torch.clamp_((wcol - z_col).div_(s_col).add_(8).round_(), lo_code, hi_code)
            codes[col] = qc
            e = (wcol - ((qc - 8) * s_col + z_col)).div_(u1[i, i])
            w1[i:].sub_(torch.outer(u1[i, i:], e))
            err1[i] = e
        weight[:, i2:] -= err1.t() @ u[i1:i2, i2:]
    return codes.t().to(torch.int32).contiguous(), scale, zero


class GPTQQuantizer(Int4Quantizer):
    """int4 projections by GPTQ on the shipped calibration text (``gptq``).

    Context: ``tokenize`` (``str -> list[int]``, the model's tokenizer) turns the text
    into the token ids ``run`` takes; :meth:`prepare` raises ValueError without it.
    The head follows ``config.head`` (round-to-nearest, as ``int4`` and ``int8`` do).
    """

    config_class: ClassVar[type[BaseModel]] = GPTQConfig
    method: ClassVar[str] = "gptq"

    def __init__(
        self,
        config: GPTQConfig | None = None,
        *,
        tokenize: Tokenize | None = None,
        **_context: object,
    ) -> None:
        super().__init__(config)
        self.config: GPTQConfig
        self.tokenize = tokenize
        # name -> (q uint8 [N, K], scale, zero) until linear_method hands it over
        self._codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Collect each projection's ``X^T X`` over the calibration text, then run GPTQ.

        Raises ValueError when ``run`` or ``tokenize`` is missing or a projection's
        columns take no int4 group.
        """
        cfg = self.config
        targets = {name: layer for name, layer in layers.items() if name != "lm_head"}
        groups = {name: self.group_for(name, layer) for name, layer in targets.items()}
        if not targets:
            return
        t0 = time.perf_counter()
        if not cfg.sequential:
            stats = calibrate(targets, run, self.tokenize, cfg, who="gptq")
            num_rows = next(iter(stats.values())).num_rows
            for name, layer in targets.items():
                self._quantize(name, layer, stats.pop(name), groups[name])
        else:
            num_rows = self._prepare_sequential(targets, run, groups)
        logger.info(
            "gptq: %d projections on %d calibration tokens in %.1f s%s",
            len(targets),
            num_rows,
            time.perf_counter() - t0,
            " (block by block)" if cfg.sequential else "",
        )

    def _quantize(self, name: str, layer: nn.Module, st: LayerStats, group: int) -> torch.Tensor:
        cfg = self.config
        assert st.xtx is not None
        q, scale, zero = gptq_quantize(
            buffer(layer, "weight"),
            st.xtx,
            group,
            bits=cfg.bits,
            symmetric=cfg.symmetric,
            damp=cfg.damp,
            block_size=cfg.block_size,
            act_order=cfg.act_order,
        )
        self._codes[name] = (q.to(torch.uint8), scale, zero)
        return unpack_int4(q, scale, zero)

    def _prepare_sequential(
        self,
        targets: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None,
        groups: Mapping[str, int],
    ) -> int:
        """Block by block: a block's inputs come through the blocks already quantized,
        whose outputs forward hooks replace by their quantized products meanwhile."""
        cfg = self.config
        seqs = calibration_sequences(
            self.tokenize,
            num_tokens=cfg.calibration_tokens,
            seq_len=cfg.calibration_seq_len,
            who="gptq",
        )
        blocks: dict[int, list[str]] = {}
        for name in targets:
            m = _BLOCK.match(name)
            blocks.setdefault(int(m.group(1)) if m else 1 << 30, []).append(name)
        handles = []
        num_rows = 0
        try:
            for index in sorted(blocks):
                names = blocks[index]
                stats = collect_stats(
                    {n: targets[n] for n in names}, run, seqs, stop_early=True, who="gptq"
                )
                num_rows = stats[names[0]].num_rows
                for name in names:
                    layer = targets[name]
                    deq = self._quantize(name, layer, stats.pop(name), groups[name])
                    deq = deq.to(buffer(layer, "weight").dtype)

                    def quantized_output(
                        module: nn.Module,
                        args: tuple[object, ...],
                        _out: object,
                        deq: torch.Tensor = deq,
                    ) -> torch.Tensor:
                        x = args[0]
                        assert isinstance(x, torch.Tensor)
                        bias = cast("torch.Tensor | None", module.bias)
                        return F.linear(x, deq, bias)

                    handles.append(layer.register_forward_hook(quantized_output))
        finally:
            for h in handles:
                h.remove()
        return num_rows

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """The GPTQ codes of ``name`` on the int4 kernel; the head by ``config.head``."""
        if name == "lm_head":
            return head_method(self.config, from_gguf=False)
        codes = self._codes.pop(name, None)
        if codes is None:
            raise ValueError(
                f"gptq: projection {name!r} was not calibrated; pass it to "
                "prepare(layers, run) before asking for its method"
            )
        q, scale, zero = codes
        group = q.shape[1] // scale.shape[1]
        cfg = self.config
        return Int4Method(
            group,
            dense_min_rows=cfg.dense_min_rows,
            qweights=(q.to(torch.int32), scale, zero),
            bits=cfg.bits,
            symmetric=cfg.symmetric,
            name=f"gptq_int{cfg.bits}{'s' if cfg.symmetric else ''}_g{group}",
        )
