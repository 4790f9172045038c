"""``structured``: whole FFN channels and query heads removed, the dense matrices shrunk.

In the spirit of FLAP (An et al., arXiv 2312.11983) and SliceGPT: what is removed is a
whole input channel of a consuming projection with everything that produces it, so
the remaining matrices are smaller dense ones and any dense kernel runs faster:

* an FFN channel ``j`` of block ``b`` is row ``j`` of gate, row ``j`` of up (both in
  ``gate_up_proj``) and column ``j`` of ``down_proj``;
* a query head ``h`` is its ``head_dim`` rows of q in ``qkv_proj`` and its columns of
  ``o_proj``. Every KV group of a block loses the same number of query heads, so the
  block stays grouped-query attention with all its KV heads and the KV cache keeps its
  layout.

Scores come from the consuming projection's inputs over the calibration text (FLAP's
"fluctuation": the input channel's variance times the squared norm of its weight
column). With ``allocation="global"`` the scores are standardized within each block and
ranked over all blocks together, so blocks that matter less lose more (FLAP's adaptive
structure): a pruned model has per-block widths and head counts, which :meth:`apply`
returns. Then the consuming projection is refitted to its kept inputs: by least
squares on the calibration statistics (``||W X - W' X_S - b'||^2``, a bias absorbing
the removed inputs' mean), or, as FLAP does, by the bias alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from pydantic import BaseModel
from torch import nn

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import BlockShape, SparsityProfile
from sagellm.sparsity.calibration import InputStats, Tokenize, calibrate
from sagellm.sparsity.config import PROJECTIONS, Projection, StructuredConfig
from sagellm.sparsity.pruning import select_targets, weight_of

__all__ = ["BlockLayers", "StructuredSparsifier", "refit", "resize_linear"]

_NAME = re.compile(r"^layers\.(\d+)\.(\w+)$")


@dataclass
class BlockLayers:
    """The four projections of one decoder block and its head geometry."""

    index: int
    qkv: nn.Module
    o: nn.Module
    gate_up: nn.Module
    down: nn.Module
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def resize_linear(
    layer: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    output_sizes: Sequence[int] | None = None,
) -> None:
    """Give ``layer`` a new (smaller) weight ``[out, in]`` and bias, with its sizes."""
    old = weight_of("layer", layer)
    layer.weight = nn.Parameter(weight.to(old.dtype).contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(old.dtype).contiguous(), requires_grad=False)
    out, inp = weight.shape
    # plain attributes of the engine's Linear (not tensors or modules)
    sizes: dict[str, object] = {
        "input_size": int(inp),
        "output_size": int(out),
        "output_sizes": tuple(int(s) for s in (output_sizes or (out,))),
    }
    if hasattr(layer, "packed"):
        sizes["packed"] = None
    for key, value in sizes.items():
        setattr(layer, key, value)


def refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    stats: InputStats,
    mode: str,
    damp: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consuming projection restricted to input columns ``keep``, refitted.

    ``mode``: "least_squares" minimises ``||W x + b - W' x_keep - b'||^2`` over the
    calibration inputs plus ``damp * mean(diag) * ||W' - W_keep||^2`` (a ridge towards
    the kept columns, for inputs the calibration text barely spans); "bias" keeps the
    kept columns and adds the removed columns' mean contribution to the bias (FLAP);
    "none" keeps the kept columns. Returns ``(W' [out, len(keep)], b' or None)``.
    """
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    if mode == "none":
        return w[:, keep].float(), None if b is None else b.float()
    mean = stats.mean.double().to(w.device)
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    removed[keep] = False
    if mode == "bias":
        extra = w[:, removed] @ mean[removed]
        return w[:, keep].float(), (extra if b is None else b + extra).float()
    if mode != "least_squares":
        raise ValueError(f"refit mode {mode!r} is not least_squares, bias or none")
    assert stats.xtx is not None, "least-squares refit needs X^T X"
    n = max(stats.num_rows, 1)
    k = w.shape[1]
    # second moments of [x, 1]: [[X^T X, sum x], [sum x^T, n]] / n
    a = torch.empty(k + 1, k + 1, dtype=torch.float64, device=w.device)
    a[:k, :k] = stats.xtx.double().to(w.device) / n
    a[:k, k] = mean
    a[k, :k] = mean
    a[k, k] = 1.0
    wb = torch.cat(
        [w, (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype))[:, None]], 1
    )
    cols = torch.cat([keep.to(w.device), torch.tensor([k], device=w.device)])
    a_ss = a[cols][:, cols]
    # the ridge pulls towards the kept columns as they are (not towards zero), so inputs
    # that carried nothing are removed without changing the rest
    ridge = torch.full((len(cols),), float(damp * a_ss.diagonal()[:-1].mean().clamp_min(1e-12)))
    ridge[-1] = 0.0
    ridge = ridge.to(device=w.device, dtype=torch.float64)
    rhs = wb @ a[:, cols] + wb[:, cols] * ridge[None, :]  # [out, |S| + 1]
    sol = torch.linalg.solve(a_ss + torch.diag(ridge), rhs.t()).t()
    return sol[:, :-1].float(), sol[:, -1].float()


def _round_to_multiple(value: float, multiple: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, multiple * round(value / multiple))))


class StructuredSparsifier:
    """``structured``: FFN channels and query heads removed per block (FLAP / SliceGPT)."""

    config_class: ClassVar[type[BaseModel]] = StructuredConfig
    method: ClassVar[str] = "structured"
    calibrates: ClassVar[bool] = True

    def __init__(
        self,
        config: StructuredConfig | None = None,
        *,
        tokenize: Tokenize | None = None,
        head_dim: int | None = None,
        **_context: object,
    ) -> None:
        self.config = config if config is not None else StructuredConfig()
        self.tokenize = tokenize
        self.head_dim = head_dim
        self.stats: dict[str, InputStats] = {}
        self._prepared = False

    def profile(self) -> SparsityProfile:
        """The FFN fraction as the headline sparsity (heads are reported by apply)."""
        return SparsityProfile(
            method=self.method,
            pattern="structured",
            sparsity=self.config.ffn_sparsity,
            calibrated=True,
        )

    @property
    def prunes_ffn(self) -> bool:
        """FFN channels are removed."""
        t = self.config.targets
        return self.config.ffn_sparsity > 0 and "gate_up_proj" in t and "down_proj" in t

    @property
    def prunes_heads(self) -> bool:
        """Query heads are removed."""
        t = self.config.targets
        return self.config.head_sparsity > 0 and "qkv_proj" in t and "o_proj" in t

    # ------------------------------------------------------------------ structure

    def blocks(self, layers: Mapping[str, nn.Module]) -> list[BlockLayers]:
        """The pruned blocks with their projections; ValueError when one is incomplete
        or its shapes do not fit a Llama block."""
        targets = select_targets(layers, self.config.model_copy(update={"targets": _ALL}))
        by_block: dict[int, dict[str, nn.Module]] = {}
        for name, layer in targets.items():
            match = _NAME.match(name)
            assert match is not None
            by_block.setdefault(int(match.group(1)), {})[match.group(2)] = layer
        out = []
        for index in sorted(by_block):
            parts = by_block[index]
            missing = [k for k in _ALL if k not in parts]
            if missing:
                raise ValueError(
                    f"structured pruning needs every projection of block {index}; "
                    f"layers.{index}.{missing[0]} is missing"
                )
            qkv, gate_up = parts["qkv_proj"], parts["gate_up_proj"]
            q_kv = tuple(getattr(qkv, "output_sizes", ()))
            gu = tuple(getattr(gate_up, "output_sizes", ()))
            if len(q_kv) != 3 or q_kv[1] != q_kv[2]:
                raise ValueError(
                    f"layers.{index}.qkv_proj must stack q, k, v (output_sizes of three, k "
                    f"and v equal), got {q_kv}"
                )
            if len(gu) != 2 or gu[0] != gu[1]:
                raise ValueError(
                    f"layers.{index}.gate_up_proj must stack gate and up (two equal "
                    f"output_sizes), got {gu}"
                )
            num_heads = num_kv = 0
            if self.prunes_heads:
                hd = self.head_dim
                if hd is None:
                    raise ValueError(
                        "structured head pruning needs the model's head size: build the "
                        "sparsifier with head_dim=<int>"
                    )
                if q_kv[0] % hd or q_kv[1] % hd:
                    raise ValueError(
                        f"layers.{index}.qkv_proj: q and kv sizes {q_kv[:2]} are not "
                        f"multiples of head_dim={hd}"
                    )
                num_heads, num_kv = q_kv[0] // hd, q_kv[1] // hd
                if num_kv == 0 or num_heads % num_kv:
                    raise ValueError(
                        f"layers.{index}: {num_heads} query heads do not split into "
                        f"{num_kv} KV groups"
                    )
            elif self.head_dim:
                num_heads, num_kv = q_kv[0] // self.head_dim, q_kv[1] // self.head_dim
            out.append(
                BlockLayers(
                    index,
                    qkv,
                    parts["o_proj"],
                    gate_up,
                    parts["down_proj"],
                    num_heads,
                    num_kv,
                    int(gu[0]),
                )
            )
        return out

    # ------------------------------------------------------------------ protocol

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Statistics of the inputs of every pruned block's ``down_proj`` and ``o_proj``."""
        blocks = self.blocks(layers)
        hooked: dict[str, nn.Module] = {}
        for b in blocks:
            if self.prunes_ffn:
                hooked[f"layers.{b.index}.down_proj"] = b.down
            if self.prunes_heads:
                hooked[f"layers.{b.index}.o_proj"] = b.o
        least_squares = self.config.reconstruct == "least_squares"
        if not hooked:
            self._prepared = True
            return
        self.stats = calibrate(
            hooked, run, self.tokenize, self.config, xtx=least_squares, who=self.method
        )
        self._prepared = True

    def apply(self, layers: Mapping[str, nn.Module]) -> dict[int, BlockShape]:
        """Remove the chosen channels and heads; each changed block's new shape."""
        if not self._prepared:
            raise ValueError("structured: call prepare(layers, run) before apply(layers)")
        blocks = self.blocks(layers)
        keep_ffn = self._choose_ffn(blocks) if self.prunes_ffn else {}
        keep_heads = self._choose_heads(blocks) if self.prunes_heads else {}
        cfg = self.config
        shapes: dict[int, BlockShape] = {}
        with torch.no_grad():
            for b in blocks:
                changed = False
                inter, heads = b.intermediate_size, b.num_heads
                keep = keep_ffn.get(b.index)
                if keep is not None and len(keep) < b.intermediate_size:
                    gu = weight_of("gate_up_proj", b.gate_up).detach()
                    rows = torch.cat([keep, keep + b.intermediate_size])
                    gu_bias = cast("torch.Tensor | None", b.gate_up.bias)
                    resize_linear(
                        b.gate_up,
                        gu[rows],
                        None if gu_bias is None else gu_bias[rows],
                        (len(keep), len(keep)),
                    )
                    w, bias = refit(
                        weight_of("down_proj", b.down),
                        cast("torch.Tensor | None", b.down.bias),
                        keep,
                        self.stats[f"layers.{b.index}.down_proj"],
                        cfg.reconstruct,
                        cfg.damp,
                    )
                    resize_linear(b.down, w, bias)
                    inter, changed = len(keep), True
                kept_heads = keep_heads.get(b.index)
                if kept_heads is not None and len(kept_heads) < b.num_heads:
                    assert self.head_dim is not None
                    hd = self.head_dim
                    cols = (kept_heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
                    qkv = weight_of("qkv_proj", b.qkv).detach()
                    q_size = b.num_heads * hd
                    kv_size = b.num_kv_heads * hd
                    rows = torch.cat([cols, torch.arange(q_size, q_size + 2 * kv_size)])
                    qkv_bias = cast("torch.Tensor | None", b.qkv.bias)
                    resize_linear(
                        b.qkv,
                        qkv[rows],
                        None if qkv_bias is None else qkv_bias[rows],
                        (len(cols), kv_size, kv_size),
                    )
                    w, bias = refit(
                        weight_of("o_proj", b.o),
                        cast("torch.Tensor | None", b.o.bias),
                        cols,
                        self.stats[f"layers.{b.index}.o_proj"],
                        cfg.reconstruct,
                        cfg.damp,
                    )
                    resize_linear(b.o, w, bias)
                    heads, changed = len(kept_heads), True
                if changed:
                    shapes[b.index] = BlockShape(inter, heads, b.num_kv_heads)
        self.stats = {}  # the Gram matrices are large and not needed again
        return shapes

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """Smaller dense matrices need no method of their own."""
        return None

    # ------------------------------------------------------------------ choosing

    def _column_scores(self, stats: InputStats, weight: torch.Tensor) -> torch.Tensor:
        col_sq = weight.detach().float().pow(2).sum(dim=0)
        metric = self.config.metric
        if metric == "fluctuation":
            return stats.variance * col_sq
        if metric == "wanda":
            return stats.norm * col_sq.sqrt()
        return col_sq.sqrt()

    def _allocate(self, scores: Mapping[int, torch.Tensor], fraction: float) -> dict[int, float]:
        """How many units each block removes (before rounding): one global threshold on
        block-standardized scores, or the same fraction everywhere."""
        if self.config.allocation == "uniform":
            return {i: fraction * len(s) for i, s in scores.items()}
        z = {i: (s - s.mean()) / s.std().clamp_min(1e-12) for i, s in scores.items()}
        every = torch.cat([v for v in z.values()])
        num = int(fraction * every.numel())
        if num == 0:
            return {i: 0.0 for i in scores}
        threshold = torch.sort(every, stable=True).values[num - 1]
        return {i: float((v <= threshold).sum()) for i, v in z.items()}

    def _choose_ffn(self, blocks: Sequence[BlockLayers]) -> dict[int, torch.Tensor]:
        cfg = self.config
        scores = {
            b.index: self._column_scores(
                self.stats[f"layers.{b.index}.down_proj"], weight_of("down_proj", b.down)
            )
            for b in blocks
        }
        removed = self._allocate(scores, cfg.ffn_sparsity)
        out = {}
        for b in blocks:
            width = b.intermediate_size
            mult = min(cfg.channel_multiple, width)
            lo = min(width, max(mult, math.ceil(cfg.min_ffn_fraction * width / mult) * mult))
            kept = _round_to_multiple(width - removed[b.index], mult, lo, width)
            order = torch.argsort(scores[b.index], descending=True, stable=True)
            out[b.index] = torch.sort(order[:kept]).values
        return out

    def _choose_heads(self, blocks: Sequence[BlockLayers]) -> dict[int, torch.Tensor]:
        cfg = self.config
        assert self.head_dim is not None
        hd = self.head_dim
        scores = {}
        for b in blocks:
            cols = self._column_scores(
                self.stats[f"layers.{b.index}.o_proj"], weight_of("o_proj", b.o)
            )
            scores[b.index] = cols.reshape(b.num_heads, hd).sum(dim=1)
        removed = self._allocate(scores, cfg.head_sparsity)
        out = {}
        for b in blocks:
            group = b.num_heads // b.num_kv_heads
            per_group = int(min(group - 1, max(0, round(removed[b.index] / b.num_kv_heads))))
            kept = []
            for g in range(b.num_kv_heads):
                s = scores[b.index][g * group : (g + 1) * group]
                best = torch.argsort(s, descending=True, stable=True)[: group - per_group]
                kept.append(torch.sort(best).values + g * group)
            out[b.index] = torch.cat(kept)
        return out


_ALL: tuple[Projection, ...] = PROJECTIONS
