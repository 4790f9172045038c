"""Masking sparsifiers: ``magnitude`` and ``wanda`` (and the base SparseGPT shares).

Each zeroes weights of the chosen projections in place and keeps every shape; the model
needs nothing else. Which weights go is a score per weight compared within a group:

* ``magnitude``: ``|w|``, compared over the whole projection (unstructured), or within
  each run of ``m`` columns of a row (n:m);
* ``wanda`` (Sun et al., arXiv 2306.11695): ``|w_ij| * ||x_j||_2``, the weight times the
  L2 norm of its input channel over the calibration text, compared within each output
  row (the paper's finding: per-output comparison matters for LLMs) or within each run
  of ``m`` columns (n:m). No weight update.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from pydantic import BaseModel
from torch import nn

from sagellm.core.protocols import LinearMethod
from sagellm.core.types import BlockShape, SparsityProfile
from sagellm.sparsity.calibration import InputStats, Tokenize, calibrate
from sagellm.sparsity.config import (
    CalibrationOptions,
    MagnitudeConfig,
    PruneOptions,
    SparsityConfig,
    WandaConfig,
    parse_pattern,
)
from sagellm.sparsity.masks import check_nm_shape, nm_mask, row_mask, tensor_mask
from sagellm.sparsity.methods import SemiStructuredMethod, semi_structured_support

__all__ = ["MagnitudeSparsifier", "MaskingSparsifier", "WandaSparsifier", "select_targets"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^layers\.(\d+)\.(\w+)$")  # "layers.3.qkv_proj": block 3, qkv_proj


def select_targets(layers: Mapping[str, nn.Module], config: SparsityConfig) -> dict[str, nn.Module]:
    """The layers a sparsifier prunes: block projections of the configured kinds, minus
    the first ``skip_first`` and last ``skip_last`` blocks (the head never)."""
    blocks = [int(m.group(1)) for n in layers if (m := _NAME.match(n))]
    num_blocks = max(blocks) + 1 if blocks else 0
    lo, hi = config.skip_first, num_blocks - config.skip_last
    out: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        match = _NAME.match(name)
        if match is None or match.group(2) not in config.targets:
            continue
        if lo <= int(match.group(1)) < hi:
            out[name] = layer
    return out


def weight_of(name: str, layer: nn.Module) -> torch.Tensor:
    """The layer's float weight ``[out, in]``; ValueError when it has none."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{name}: a sparsifier prunes a float weight [out, in] (layer.weight); prune "
            "before quantizing, or give a projection that still has its weight"
        )
    return weight


class MaskingSparsifier:
    """Zeroes the lowest-scoring weights of each target projection (shapes unchanged)."""

    config_class: ClassVar[type[BaseModel]] = PruneOptions
    method: ClassVar[str] = "masking"
    calibrates: ClassVar[bool] = False

    def __init__(
        self,
        config: PruneOptions | None = None,
        *,
        tokenize: Tokenize | None = None,
        **_context: object,
    ) -> None:
        self.config: PruneOptions = config if config is not None else cast(Any, self.config_class)()
        self.tokenize = tokenize
        self.nm = parse_pattern(self.config.pattern)
        self.stats: dict[str, InputStats] = {}
        self._prepared = False
        self._pruned: set[str] = set()

    def profile(self) -> SparsityProfile:
        """Pattern and fraction of the pruned projections' weights removed."""
        if self.nm is None:
            return SparsityProfile(
                method=self.method,
                pattern="unstructured",
                sparsity=self.config.sparsity,
                calibrated=self.calibrates,
            )
        n, m = self.nm
        return SparsityProfile(
            method=self.method,
            pattern="n:m",
            sparsity=1.0 - n / m,
            n=n,
            m=m,
            calibrated=self.calibrates,
        )

    # ------------------------------------------------------------------ protocol

    def needs_xtx(self, name: str) -> bool:
        """Whether calibration keeps ``X^T X`` of layer ``name``."""
        return False

    def prepare(
        self,
        layers: Mapping[str, nn.Module],
        run: Callable[[Sequence[int]], object] | None = None,
    ) -> None:
        """Check the shapes; a calibrating sparsifier also runs the calibration text."""
        targets = select_targets(layers, self.config)
        for name, layer in targets.items():
            w = weight_of(name, layer)
            if self.nm is not None:
                check_nm_shape(w.shape[1], *self.nm, who=f"{name}: pattern")
        if self.calibrates:
            assert isinstance(self.config, CalibrationOptions)
            self.stats = calibrate(
                targets, run, self.tokenize, self.config, xtx=self.needs_xtx, who=self.method
            )
        self._prepared = True

    def apply(self, layers: Mapping[str, nn.Module]) -> dict[int, BlockShape]:
        """Zero the pruned weights in place; masks keep shapes, so ``{}``."""
        if self.calibrates and not self._prepared:
            raise ValueError(f"{self.method}: call prepare(layers, run) before apply(layers)")
        targets = select_targets(layers, self.config)
        for name, layer in targets.items():
            w = weight_of(name, layer)
            if self.nm is not None:
                check_nm_shape(w.shape[1], *self.nm, who=f"{name}: pattern")
            with torch.no_grad():
                pruned = self.prune(name, w.detach().float())
                w.copy_(pruned.to(w.dtype))
            if hasattr(layer, "packed"):
                # the checkpoint's blocks no longer hold this weight
                cast(Any, layer).packed = None
            self._pruned.add(name)
        return {}

    def linear_method(self, name: str, layer: nn.Module) -> LinearMethod | None:
        """torch's semi-structured kernels for a 2:4-pruned projection where the device
        has them (CUDA, float16/bfloat16); None elsewhere."""
        if self.nm != (2, 4) or self.config.semi_structured == "off" or name not in self._pruned:
            return None
        w = weight_of(name, layer)
        reason = semi_structured_support(w.device, w.dtype)
        rows, cols = w.shape
        if reason is None and (rows % 64 or cols % 64):
            reason = f"its shape {rows} x {cols} is not a multiple of 64"
        if reason is not None:
            logger.debug("%s: no semi-structured kernel (%s)", name, reason)
            return None
        return SemiStructuredMethod()

    # ------------------------------------------------------------------ scoring

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of each weight (float32 ``[out, in]``); higher is kept."""
        raise NotImplementedError

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """True where a weight goes: per row (unstructured) or per group of m (n:m)."""
        if self.nm is not None:
            return nm_mask(scores, *self.nm)
        return row_mask(scores, self.config.sparsity)

    def prune(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The pruned float32 weight of layer ``name``."""
        out = weight.clone()
        out[self.mask(self.scores(name, weight))] = 0.0
        return out


class MagnitudeSparsifier(MaskingSparsifier):
    """``magnitude``: the smallest ``|w|`` of each projection are zeroed."""

    config_class: ClassVar[type[BaseModel]] = MagnitudeConfig
    method: ClassVar[str] = "magnitude"

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``|w|``."""
        return weight.abs()

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Layer-wise for unstructured sparsity (the classic baseline), per group for n:m."""
        if self.nm is not None:
            return nm_mask(scores, *self.nm)
        return tensor_mask(scores, self.config.sparsity)


class WandaSparsifier(MaskingSparsifier):
    """``wanda``: the smallest ``|w_ij| * ||x_j||_2`` of each output row are zeroed."""

    config_class: ClassVar[type[BaseModel]] = WandaConfig
    method: ClassVar[str] = "wanda"
    calibrates: ClassVar[bool] = True

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``|w| * ||x||_2`` (the norm of each input channel over the calibration text)."""
        return weight.abs() * self.stats[name].norm.to(weight.device)[None, :]
