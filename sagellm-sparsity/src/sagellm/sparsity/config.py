"""Configuration of the sparsifiers, one frozen model each."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CalibrationOptions",
    "MagnitudeConfig",
    "PROJECTIONS",
    "Projection",
    "PruneOptions",
    "SparseGPTConfig",
    "SparsityConfig",
    "StructuredConfig",
    "WandaConfig",
    "parse_pattern",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")

#: A kind of projection of a decoder block (the last part of a layer's name).
Projection = Literal["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

#: Every kind, in block order.
PROJECTIONS: tuple[Projection, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (n non-zeros in every m); ``"unstructured"`` -> None.

    Raises ValueError for anything else, naming the accepted spellings.
    """
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern)
    if match is None:
        raise ValueError(
            f"pattern {pattern!r} is neither 'unstructured' nor 'N:M' (N non-zeros in every "
            "M consecutive weights of a row, e.g. '2:4' or '4:8')"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (e.g. '2:4', '4:8')")
    return n, m


class SparsityConfig(BaseModel):
    """Options every sparsifier shares."""

    model_config = _FROZEN

    # projection kinds pruned (the output head is never pruned: it is the token
    # embedding itself in tied models)
    targets: tuple[Projection, ...] = PROJECTIONS
    # first and last decoder blocks left dense (small models lose the most there)
    skip_first: int = Field(0, ge=0)
    skip_last: int = Field(0, ge=0)


class PruneOptions(SparsityConfig):
    """Options of the masking sparsifiers (weights zeroed, shapes kept)."""

    # fraction of each pruned projection's weights set to zero (unstructured only)
    sparsity: float = Field(0.5, ge=0.0, le=0.95)
    # "unstructured" or "N:M": at most N non-zeros in every M consecutive input weights
    # of a row ("2:4", "4:8"; the fraction is then 1 - N/M and `sparsity` is ignored)
    pattern: str = "unstructured"
    # "auto": on CUDA, projections with a 2:4 mask compute through torch's semi-structured
    # sparse kernels (to_sparse_semi_structured) where the device and torch have them;
    # "off": the dense product of the zeroed weight everywhere
    semi_structured: Literal["auto", "off"] = "auto"

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value


class CalibrationOptions(BaseModel):
    """How much of the shipped calibration text a calibrating sparsifier runs."""

    model_config = _FROZEN

    # tokens of data/calibration.txt run through the model (the whole text when shorter)
    calibration_tokens: int = Field(2048, ge=8)
    calibration_seq_len: int = Field(512, ge=8)  # tokens per forward pass (one sequence)


class MagnitudeConfig(PruneOptions):
    """``magnitude``: the smallest ``|w|`` of each projection go (no calibration)."""


class WandaConfig(PruneOptions, CalibrationOptions):
    """``wanda``: the smallest ``|w| * ||x||_2`` of each output row go (Sun et al. 2023)."""


class SparseGPTConfig(PruneOptions, CalibrationOptions):
    """``sparsegpt``: OBS pruning with reconstruction (Frantar and Alistarh 2023)."""

    # dampening added to the Hessian's diagonal, as a fraction of its mean. The paper's
    # 0.01 has hundreds of thousands of calibration tokens; the shipped text gives about
    # as many tokens as an FFN has channels, where 0.01 overfits (a 1536-column layer,
    # held-out error at 1024 / 2048 / 4096 tokens: 0.283 / 0.222 / 0.205 at 0.01,
    # 0.242 / 0.215 / 0.204 at 0.1; magnitude 0.265)
    damp: float = Field(0.1, gt=0.0, le=1.0)
    block_size: int = Field(128, ge=1)  # columns per lazy update; also the mask's block


class StructuredConfig(SparsityConfig, CalibrationOptions):
    """``structured``: whole FFN channels and query heads removed, matrices shrunk (FLAP)."""

    # fraction of the FFN channels (SwiGLU width) removed over the pruned blocks
    ffn_sparsity: float = Field(0.25, ge=0.0, le=0.9)
    # fraction of the query heads removed over the pruned blocks; the same number in
    # every KV group of a block, so KV heads and the KV cache are unchanged
    head_sparsity: float = Field(0.0, ge=0.0, le=0.9)
    # how a channel or head is scored: "fluctuation" (FLAP: input variance times the
    # squared norm of its column in the consuming projection), "wanda" (input L2 norm
    # times that column's norm), "magnitude" (that column's norm)
    metric: Literal["fluctuation", "wanda", "magnitude"] = "fluctuation"
    # "global": blocks compete (scores standardized per block, one threshold, so blocks
    # end up with different widths, as in FLAP); "uniform": every block loses the same
    allocation: Literal["global", "uniform"] = "global"
    # how the consuming projection (down_proj, o_proj) is refitted to the kept inputs:
    # "least_squares" (its output on the calibration inputs, with a bias for the removed
    # inputs' mean), "bias" (FLAP's mean compensation only), "none"
    reconstruct: Literal["least_squares", "bias", "none"] = "least_squares"
    # kept FFN channels are a multiple of this (int4 kernels take group sizes 32-128)
    channel_multiple: int = Field(64, ge=1)
    # fewest FFN channels a block keeps, as a fraction of its width
    min_ffn_fraction: float = Field(0.1, ge=0.0, le=1.0)
    # ridge of the least-squares refit towards the kept weights, as a fraction of the
    # inputs' mean second moment: the calibration text has about as many tokens as an FFN
    # has channels, so a weak ridge overfits it (measured on the embedded model at 30%:
    # held-out KL 0.71 at 0.01, 0.53 at 0.1, 0.46 at 1.0; FLAP's bias-only refit 0.53)
    damp: float = Field(1.0, gt=0.0, le=100.0)
