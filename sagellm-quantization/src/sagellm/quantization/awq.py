"""``awq``: activation-aware int4 weights (Lin et al., arXiv 2306.00978), plain torch.

A few input channels carry much larger activations than the rest, and the rounding
error of their weights dominates the output error. AWQ scales each input channel's
weights up by ``s = mean|x|^alpha`` (normalised so ``max(s) * min(s) = 1``) before
round-to-nearest and divides the input by ``s``, which leaves the float product
unchanged and gives the salient channels a finer grid. ``alpha`` is grid-searched per
projection (20 values, 0 included, so the search never does worse than plain
round-to-nearest on its objective); then, optionally, each group's range is shrunk
where clipping its extremes lowers the error (AWQ's auto-clip).

Both searches minimise the projection's own squared output error on the calibration
inputs, computed exactly from ``X^T X``: ``||X (W - Q)^T||^2 = tr((W - Q) X^T X (W -
Q)^T)`` (the clip search, like AWQ's, per group on the group's own inputs). AWQ's
reference measures the output of the whole attention or MLP block instead; a projection
here sees only its input. The ``1 / s`` is multiplied into the input on each call
(:class:`~sagellm.quantization.methods.ScaledInt4Method`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from sagellm.core.protocols import LinearMethod
from sagellm.quantization.calibration import Tokenize, calibrate
from sagellm.quantization.config import AWQConfig
from sagellm.quantization.formats import int4_params, int4_round, int4_rtn, unpack_int4
from sagellm.quantization.methods import ScaledInt4Method, buffer
from sagellm.quantization.rtn import Int4Quantizer, head_method

__all__ = ["AWQQuantizer", "AWQResult", "awq_quantize", "output_error"]

logger = logging.getLogger(__name__)


def output_error(w: torch.Tensor, wq: torch.Tensor, xtx: torch.Tensor) -> float:
    """``||X W^T - X Wq^T||^2`` from ``xtx = X^T X`` (float32 product, float64 sum)."""
    d = w.float() - wq.float()
    return float(((d @ xtx.float()) * d).sum(dtype=torch.float64))


@dataclass(frozen=True)
class AWQResult:
    """One projection's AWQ codes: ``W ~ ((q - 8) * scale + zero) / s`` per column."""

    q: torch.Tensor  # int32 [N, K] codes of the scaled weight W * s
    scale: torch.Tensor  # float32 [N, K / g]
    zero: torch.Tensor  # float32 [N, K / g]
    input_scale: torch.Tensor  # float32 [K]: 1 / s, multiplied into the input
    alpha: float  # the exponent chosen
    error: float  # squared output error on the calibration inputs
    rtn_error: float  # the same of plain round-to-nearest


def _clip_search(
    ws: torch.Tensor,
    hs: torch.Tensor,
    group_size: int,
    *,
    bits: int,
    symmetric: bool,
    clip_grid: int,
    max_shrink: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, group) range shrink of ``ws`` minimising that group's own output error."""
    n, k = ws.shape
    num_groups = k // group_size
    wg = ws.reshape(n, num_groups, group_size)
    blocks = torch.stack(
        [hs[i : i + group_size, i : i + group_size] for i in range(0, k, group_size)]
    )
    best_err = torch.full((n, num_groups), float("inf"))
    best_scale = torch.zeros(n, num_groups)
    best_zero = torch.zeros(n, num_groups)
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    for i in range(max(1, int(max_shrink * clip_grid))):
        r = 1.0 - i / clip_grid
        clipped = torch.maximum(torch.minimum(wg, hi * r), lo * r)
        scale, zero = int4_params(clipped, bits, symmetric)
        q = int4_round(wg, scale, zero, bits, symmetric)
        d = wg - ((q.float() - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1))
        err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    q = int4_round(wg, best_scale, best_zero, bits, symmetric).reshape(n, k)
    return q, best_scale, best_zero


def awq_quantize(
    w: torch.Tensor,
    xtx: torch.Tensor,
    abs_mean: torch.Tensor,
    group_size: int,
    *,
    bits: int = 4,
    symmetric: bool = False,
    grid: int = 20,
    clip: bool = True,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> AWQResult:
    """AWQ of ``w`` ``[N, K]`` given its inputs' ``X^T X`` and mean ``|x|`` per channel."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the {k} input columns")
    if tuple(xtx.shape) != (k, k) or tuple(abs_mean.shape) != (k,):
        raise ValueError(f"calibration statistics do not fit {k} input columns")
    wf = w.detach().float()
    h = xtx.float()
    x_mean = abs_mean.float().clamp_min(0)
    best: tuple[float, float, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None
    best = None
    rtn_error = 0.0
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        codes = int4_rtn(wf * s, group_size, bits=bits, symmetric=symmetric)
        err = output_error(wf, unpack_int4(*codes) / s, h)
        if i == 0:
            rtn_error = err
        if best is None or err < best[0]:
            best = (err, alpha, s, codes)
    assert best is not None
    err, alpha, s, codes = best
    if clip:
        ws = wf * s
        hs = h / s.unsqueeze(0) / s.unsqueeze(1)
        clipped = _clip_search(
            ws,
            hs,
            group_size,
            bits=bits,
            symmetric=symmetric,
            clip_grid=clip_grid,
            max_shrink=max_shrink,
        )
        clip_err = output_error(wf, unpack_int4(*clipped) / s, h)
        # the clip search sees each group alone; keep it only where the whole agrees
        if clip_err < err:
            err, codes = clip_err, clipped
    q, scale, zero = codes
    return AWQResult(q, scale, zero, 1.0 / s, alpha, err, rtn_error)


class AWQQuantizer(Int4Quantizer):
    """int4 projections by AWQ on the shipped calibration text (``awq``).

    Context: ``tokenize`` (``str -> list[int]``, the model's tokenizer); :meth:`prepare`
    raises ValueError without it. The head follows ``config.head``.
    """

    config_class: ClassVar[type[BaseModel]] = AWQConfig
    method: ClassVar[str] = "awq"

    def __init__(
        self,
        config: AWQConfig | None = None,
        *,
        tokenize: Tokenize | None = None,
        **_context: object,
    ) -> None:
        super().__init__(config)
        self.config: AWQConfig
        self.tokenize = tokenize
        self._results: dict[str, AWQResult] = {}

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Collect each projection's input statistics, then search its scales.

        Raises ValueError when ``run`` or ``tokenize`` is missing or a projection's
        columns take no int4 group.
        """
        cfg = self.config
        targets = {name: layer for name, layer in layers.items() if name != "lm_head"}
        groups = {name: self.group_for(name, layer) for name, layer in targets.items()}
        if not targets:
            return
        t0 = time.perf_counter()
        stats = calibrate(targets, run, self.tokenize, cfg, who="awq")
        t1 = time.perf_counter()
        gains = []
        for name, layer in targets.items():
            st = stats.pop(name)
            assert st.xtx is not None
            res = awq_quantize(
                buffer(layer, "weight"),
                st.xtx,
                st.abs_mean,
                groups[name],
                bits=cfg.bits,
                symmetric=cfg.symmetric,
                grid=cfg.grid,
                clip=cfg.clip,
                clip_grid=cfg.clip_grid,
                max_shrink=cfg.max_shrink,
            )
            self._results[name] = AWQResult(
                res.q.to(torch.uint8),
                res.scale,
                res.zero,
                res.input_scale,
                res.alpha,
                res.error,
                res.rtn_error,
            )
            if res.rtn_error > 0:
                gains.append(res.error / res.rtn_error)
        logger.info(
            "awq: %d projections (inputs %.1f s, search %.1f s), output error %.2f of "
            "round-to-nearest's on average",
            len(targets),
            t1 - t0,
            time.perf_counter() - t1,
            sum(gains) / max(len(gains), 1),
        )

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """The AWQ codes of ``name`` on the int4 kernel; the head by ``config.head``."""
        if name == "lm_head":
            return head_method(self.config, from_gguf=False)
        res = self._results.pop(name, None)
        if res is None:
            raise ValueError(
                f"awq: projection {name!r} was not calibrated; pass it to "
                "prepare(layers, run) before asking for its method"
            )
        group = res.q.shape[1] // res.scale.shape[1]
        cfg = self.config
        return ScaledInt4Method(
            group,
            input_scale=res.input_scale,
            qweights=(res.q.to(torch.int32), res.scale, res.zero),
            dense_min_rows=cfg.dense_min_rows,
            bits=cfg.bits,
            symmetric=cfg.symmetric,
            name=f"awq_int{cfg.bits}{'s' if cfg.symmetric else ''}_g{group}",
        )
