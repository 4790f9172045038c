"""Calibration: the text the package ships and the input statistics of each projection.

The calibrating quantizers (GPTQ, AWQ, SmoothQuant) see a model only through the
projections it hands to ``prepare`` and a ``run(token_ids)`` that runs the float model
over one sequence. A forward pre-hook on each projection accumulates what its method
needs from the inputs it receives during those runs: ``X^T X`` (GPTQ's Hessian, up to a
factor 2, and the exact squared output error of any weight change for AWQ's searches),
the mean and the maximum of ``|x|`` per input channel. Nothing keeps the activations
themselves, so a 2,000-token calibration of a 135M model needs a few hundred MB.

The text (``data/calibration.txt``, ``data/heldout.txt``) is the package's own
writing: prose, dialogue, a letter, recipes, questions and answers, and Python, C,
SQL, JSON and shell. The held-out part is for evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import torch
from torch import nn

from sagellm.quantization.config import CalibrationOptions
from sagellm.quantization.methods import input_size

__all__ = [
    "LayerStats",
    "calibrate",
    "Tokenize",
    "calibration_sequences",
    "collect_stats",
    "shipped_text",
]

#: ``tokenize(text)`` -> token ids, given to a calibrating quantizer's constructor.
Tokenize = Callable[[str], Sequence[int]]


def shipped_text(part: Literal["calibration", "heldout"] = "calibration") -> str:
    """The calibration text or its held-out part, as shipped in ``data/``."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"the shipped text has parts 'calibration' and 'heldout', not {part!r}")
    return (resources.files("sagellm.quantization") / "data" / f"{part}.txt").read_text("utf-8")


def calibration_sequences(
    tokenize: Tokenize | None,
    *,
    num_tokens: int,
    seq_len: int,
    part: Literal["calibration", "heldout"] = "calibration",
    who: str = "calibration",
) -> list[list[int]]:
    """The first ``num_tokens`` tokens of the shipped text, in sequences of ``seq_len``.

    Raises ValueError when ``tokenize`` is missing: the quantizer must be built with
    ``tokenize=`` (the engine passes its tokenizer's encode).
    """
    if tokenize is None:
        raise ValueError(
            f"{who} runs the model over the package's calibration text and needs its token "
            "ids: build the quantizer with tokenize=<callable str -> list[int]> (the "
            "model's tokenizer)"
        )
    ids = [int(t) for t in tokenize(shipped_text(part))][:num_tokens]
    if not ids:
        raise ValueError(f"{who}: tokenize returned no tokens for the calibration text")
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


@dataclass
class LayerStats:
    """What one projection's inputs looked like over the calibration runs."""

    input_size: int
    xtx: torch.Tensor | None  # float32 [K, K]: sum over rows of x^T x (None: not kept)
    abs_sum: torch.Tensor  # float32 [K]: sum over rows of |x|
    abs_max: torch.Tensor  # float32 [K]: max over rows of |x|
    num_rows: int = 0  # rows (tokens) seen

    def add(self, x: torch.Tensor) -> None:
        """Account for one batch of inputs ``[..., K]``."""
        xf = x.detach().reshape(-1, self.input_size).float()
        if self.xtx is not None:
            self.xtx.addmm_(xf.t(), xf)
        a = xf.abs()
        self.abs_sum += a.sum(dim=0)
        torch.maximum(self.abs_max, a.amax(dim=0), out=self.abs_max)
        self.num_rows += xf.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel (AWQ's activation scale)."""
        return self.abs_sum / max(self.num_rows, 1)


class _StopRun(Exception):
    """Raised by a hook to end a calibration run whose remaining layers are not needed."""


def _require_run(run: object, who: str) -> None:
    if run is None:
        raise ValueError(
            f"{who} calibrates on the model's activations: prepare(layers, run) needs "
            "run(token_ids), the float model's forward over one sequence"
        )


def collect_stats(
    layers: Mapping[str, nn.Module],
    run: Callable[[Sequence[int]], object] | None,
    sequences: Sequence[Sequence[int]],
    *,
    xtx: bool = True,
    stop_early: bool = False,
    who: str = "calibration",
) -> dict[str, LayerStats]:
    """Run ``run`` over ``sequences`` with a pre-hook on each layer; each layer's stats.

    ``stop_early`` ends each run (by raising through the model's forward, caught here)
    once every layer has seen that sequence's input: the rest of the model is not
    needed, which makes calibrating the first blocks of a deep model cheap. The hooks
    are removed afterwards, also when ``run`` raises. Raises ValueError when ``run`` is
    missing or a layer saw no input (the run does not call it).
    """
    _require_run(run, who)
    assert run is not None
    stats: dict[str, LayerStats] = {}
    handles = []
    seen: set[str] = set()  # layers called in the current run
    for name, layer in layers.items():
        k = input_size(layer)
        s = LayerStats(
            k,
            torch.zeros(k, k) if xtx else None,
            torch.zeros(k),
            torch.zeros(k),
        )
        stats[name] = s

        def hook(
            _module: nn.Module, args: tuple[object, ...], s: LayerStats = s, name: str = name
        ) -> None:
            x = args[0]
            assert isinstance(x, torch.Tensor)
            s.add(x)
            seen.add(name)
            if stop_early and len(seen) == len(stats):
                raise _StopRun

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for seq in sequences:
                seen.clear()
                try:
                    run(list(seq))
                except _StopRun:
                    pass
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
    xtx: bool = True,
    who: str = "calibration",
) -> dict[str, LayerStats]:
    """Each layer's input statistics over the shipped calibration text (one pass).

    Raises ValueError, before running anything, when ``run`` or ``tokenize`` is missing.
    """
    _require_run(run, who)
    seqs = calibration_sequences(
        tokenize,
        num_tokens=options.calibration_tokens,
        seq_len=options.calibration_seq_len,
        who=who,
    )
    return collect_stats(layers, run, seqs, xtx=xtx, who=who)
