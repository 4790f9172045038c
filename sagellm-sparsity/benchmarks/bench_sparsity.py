"""asv benchmarks of sagellm.sparsity, each side by side with its anchor in one process.

``PruneTime`` times Wanda and SparseGPT against magnitude pruning on one 1536 -> 576
projection (the embedded model's down projection; a 1536x1536 Hessian). ``Quality``
tracks each method's relative output error on correlated inputs, as a ratio to
magnitude pruning's (below 1: better than magnitude). ``Products`` tracks the time of
the product with a 50%-zero (2:4) weight and with a structurally shrunk one, each over
the dense product, interleaved: on CPU the zeros cost the same as the dense weight
(torch has no CPU semi-structured kernel), while removed channels save their share.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from sagellm.core.testing.quantizer import activations
from sagellm.sparsity.masks import nm_mask, row_mask, tensor_mask
from sagellm.sparsity.sparsegpt import sparsegpt_prune

_OUT, _IN = 576, 1536


def _setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(_OUT, _IN, generator=gen) * _IN**-0.5
    x = activations(_IN, 2048, seed=1)  # about the tokens of the shipped calibration text
    return w, x, x.t() @ x


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int = 15) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class PruneTime:
    """Seconds to prune one down projection at 50%."""

    timeout = 180

    def setup(self) -> None:
        self.w, self.x, self.xtx = _setup()
        self.norm = self.x.pow(2).sum(0).sqrt()

    def time_magnitude(self) -> None:
        w = self.w.clone()
        w[tensor_mask(w.abs(), 0.5)] = 0

    def time_wanda(self) -> None:
        w = self.w.clone()
        w[row_mask(w.abs() * self.norm, 0.5)] = 0

    def time_sparsegpt(self) -> None:
        sparsegpt_prune(self.w, self.xtx, sparsity=0.5)


class Quality:
    """Relative output error on held-out inputs, over magnitude pruning's."""

    timeout = 180

    def setup(self) -> None:
        self.w, x, self.xtx = _setup()
        norm = x.pow(2).sum(0).sqrt()
        self.held = activations(_IN, 512, seed=2)
        ref = self.held @ self.w.t()

        def err(w2: torch.Tensor) -> float:
            return float((self.held @ w2.t() - ref).norm() / ref.norm())

        def masked(mask: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, torch.zeros_like(self.w), self.w)

        self.errors = {
            "magnitude": err(masked(tensor_mask(self.w.abs(), 0.5))),
            "wanda": err(masked(row_mask(self.w.abs() * norm, 0.5))),
            "sparsegpt": err(sparsegpt_prune(self.w, self.xtx, sparsity=0.5)),
            "magnitude_2_4": err(masked(nm_mask(self.w.abs(), 2, 4))),
            "wanda_2_4": err(masked(nm_mask(self.w.abs() * norm, 2, 4))),
            "sparsegpt_2_4": err(sparsegpt_prune(self.w, self.xtx, nm=(2, 4))),
        }

    def track_wanda_error_over_magnitude(self) -> float:
        return self.errors["wanda"] / self.errors["magnitude"]

    def track_sparsegpt_error_over_magnitude(self) -> float:
        return self.errors["sparsegpt"] / self.errors["magnitude"]

    def track_wanda_2_4_error_over_magnitude(self) -> float:
        return self.errors["wanda_2_4"] / self.errors["magnitude_2_4"]

    def track_sparsegpt_2_4_error_over_magnitude(self) -> float:
        return self.errors["sparsegpt_2_4"] / self.errors["magnitude_2_4"]

    track_wanda_error_over_magnitude.unit = "ratio"  # type: ignore[attr-defined]
    track_sparsegpt_error_over_magnitude.unit = "ratio"  # type: ignore[attr-defined]
    track_wanda_2_4_error_over_magnitude.unit = "ratio"  # type: ignore[attr-defined]
    track_sparsegpt_2_4_error_over_magnitude.unit = "ratio"  # type: ignore[attr-defined]


class Products:
    """Product time with a pruned weight over the dense product, at 1 and 64 rows."""

    params = [[1, 64]]
    param_names = ["rows"]
    timeout = 180

    def setup(self, rows: int) -> None:
        w, _x, _xtx = _setup()
        # 24 projections (85 MB): well past the 32 MB L3 cache, as a model's weights are;
        # fewer would time the cache, not memory
        self.dense = [w.clone() for _ in range(24)]
        self.nm = [torch.where(nm_mask(w.abs(), 2, 4), torch.zeros_like(w), w) for _ in range(24)]
        self.shrunk = [w[:, : _IN // 2].contiguous() for _ in range(24)]
        self.x = activations(_IN, rows, seed=3)
        self.xs = self.x[:, : _IN // 2].contiguous()

    def _run(self, weights: list[torch.Tensor], x: torch.Tensor) -> None:
        for w in weights:
            torch.nn.functional.linear(x, w)

    def track_2_4_zeros_over_dense(self, rows: int) -> float:
        t = _interleaved(
            {
                "dense": lambda: self._run(self.dense, self.x),
                "nm": lambda: self._run(self.nm, self.x),
            }
        )
        return t["nm"] / t["dense"]

    def track_half_channels_removed_over_dense(self, rows: int) -> float:
        t = _interleaved(
            {
                "dense": lambda: self._run(self.dense, self.x),
                "shrunk": lambda: self._run(self.shrunk, self.xs),
            }
        )
        return t["shrunk"] / t["dense"]

    track_2_4_zeros_over_dense.unit = "ratio"  # type: ignore[attr-defined]
    track_half_channels_removed_over_dense.unit = "ratio"  # type: ignore[attr-defined]
