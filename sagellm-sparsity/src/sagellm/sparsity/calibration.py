"""Calibration: the text the package ships and the input statistics of each projection.

A calibrating sparsifier sees a model only through the projections it is handed and a
``run(token_ids)`` that runs the dense model over one sequence. A forward pre-hook on
each projection accumulates what its method needs from the inputs: the sum and the sum
of squares of every input channel (Wanda's ``||x_j||_2``, FLAP's variance) and, where
asked, ``X^T X`` (SparseGPT's Hessian up to a factor 2; the least-squares refit of
structured pruning). Activations themselves are not kept.

The text (``data/calibration.txt``, ``data/heldout.txt``) is public-domain prose; see
``data/SOURCES.md``. The held-out part is for evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import torch
from torch import nn

from sagellm.sparsity.config import CalibrationOptions

__all__ = [
    "InputStats",
    "Tokenize",
    "calibrate",
    "calibration_sequences",
    "collect_stats",
    "require_run",
    "shipped_text",
]

#: ``tokenize(text)`` -> token ids, given to a calibrating sparsifier's constructor.
Tokenize = Callable[[str], Sequence[int]]


def shipped_text(part: Literal["calibration", "heldout"] = "calibration") -> str:
    """The calibration text or its held-out part, as shipped in ``data/``."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"the shipped text has parts 'calibration' and 'heldout', not {part!r}")
    return (resources.files("sagellm.sparsity") / "data" / f"{part}.txt").read_text("utf-8")


def calibration_sequences(
    tokenize: Tokenize | None,
    *,
    num_tokens: int,
    seq_len: int,
    part: Literal["calibration", "heldout"] = "calibration",
    who: str = "calibration",
) -> list[list[int]]:
    """The first ``num_tokens`` tokens of the shipped text, in sequences of ``seq_len``.

    Raises ValueError when ``tokenize`` is missing or yields nothing.
    """
    if tokenize is None:
        raise ValueError(
            f"{who} runs the model over the package's calibration text and needs its token "
            "ids: build the sparsifier with tokenize=<callable str -> list[int]> (the "
            "model's tokenizer)"
        )
    ids = [int(t) for t in tokenize(shipped_text(part))][:num_tokens]
    if not ids:
        raise ValueError(f"{who}: tokenize returned no tokens for the calibration text")
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


@dataclass
class InputStats:
    """What one projection's inputs looked like over the calibration runs."""

    input_size: int
    xtx: torch.Tensor | None  # float32 [K, K]: sum over rows of x^T x (None: not kept)
    total: torch.Tensor  # float64 [K]: sum over rows of x
    sq_total: torch.Tensor  # float64 [K]: sum over rows of x^2
    num_rows: int = 0  # rows (tokens) seen

    def add(self, x: torch.Tensor) -> None:
        """Account for one batch of inputs ``[..., K]``."""
        xf = x.detach().reshape(-1, self.input_size).float()
        if self.xtx is not None:
            self.xtx.addmm_(xf.t(), xf)
        self.total += xf.sum(dim=0).double()
        self.sq_total += (xf * xf).sum(dim=0).double()
        self.num_rows += xf.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        """``||x_j||_2`` of each input channel over every row (Wanda's activation norm)."""
        return self.sq_total.sqrt().float()

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input channel."""
        return (self.total / max(self.num_rows, 1)).float()

    @property
    def variance(self) -> torch.Tensor:
        """Variance of each input channel (FLAP's fluctuation)."""
        n = max(self.num_rows, 1)
        m = self.total / n
        return (self.sq_total / n - m * m).clamp_min(0.0).float()


def require_run(run: object, who: str) -> None:
    """ValueError when a calibrating sparsifier got no ``run``."""
    if run is None:
        raise ValueError(
            f"{who} calibrates on the model's activations: prepare(layers, run) needs "
            "run(token_ids), the dense model's forward over one sequence"
        )


def _input_size(layer: nn.Module) -> int:
    size = getattr(layer, "input_size", None)
    if size is None:
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"{type(layer).__name__} has neither input_size nor a 2-D weight: a "
                "sparsifier prunes projections shaped like the engine's Linear"
            )
        size = weight.shape[1]
    return int(size)


def collect_stats(
    layers: Mapping[str, nn.Module],
    run: Callable[[Sequence[int]], object] | None,
    sequences: Sequence[Sequence[int]],
    *,
    xtx: Callable[[str], bool] | bool = True,
    who: str = "calibration",
) -> dict[str, InputStats]:
    """Run ``run`` over ``sequences`` with a pre-hook on each layer; each layer's stats.

    ``xtx``: whether (or for which layer names) ``X^T X`` is accumulated. The hooks are
    removed afterwards, also when ``run`` raises. Raises ValueError when ``run`` is
    missing or a layer saw no input (the run does not call it).
    """
    require_run(run, who)
    assert run is not None
    stats: dict[str, InputStats] = {}
    handles = []
    for name, layer in layers.items():
        k = _input_size(layer)
        keep = xtx(name) if callable(xtx) else xtx
        s = InputStats(
            k,
            torch.zeros(k, k) if keep else None,
            torch.zeros(k, dtype=torch.float64),
            torch.zeros(k, dtype=torch.float64),
        )
        stats[name] = s

        def hook(_module: nn.Module, args: tuple[object, ...], s: InputStats = s) -> None:
            x = args[0]
            assert isinstance(x, torch.Tensor)
            s.add(x)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for seq in sequences:
                run(list(seq))
    finally:
        for h in handles:
            h.remove()
    silent = [name for name, s in stats.items() if s.num_rows == 0]
    if silent:
        raise ValueError(
            f"{who}: run(token_ids) never called {len(silent)} of the layers "
            f"(first: {silent[0]!r}); it must run the model those layers belong to"
        )
    return stats


def calibrate(
    layers: Mapping[str, nn.Module],
    run: Callable[[Sequence[int]], object] | None,
    tokenize: Tokenize | None,
    options: CalibrationOptions,
    *,
    xtx: Callable[[str], bool] | bool = True,
    who: str = "calibration",
) -> dict[str, InputStats]:
    """Each layer's input statistics over the shipped calibration text (one pass).

    Raises ValueError, before running anything, when ``run`` or ``tokenize`` is missing.
    """
    require_run(run, who)
    seqs = calibration_sequences(
        tokenize,
        num_tokens=options.calibration_tokens,
        seq_len=options.calibration_seq_len,
        who=who,
    )
    return collect_stats(layers, run, seqs, xtx=xtx, who=who)
