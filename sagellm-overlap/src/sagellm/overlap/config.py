"""Configuration of sagellm.overlap."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OverlapConfig(BaseModel):
    """Options of :class:`~sagellm.overlap.scheduler.MicroBatchOverlap`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "overlap": a micro-batch's collective runs under the other micro-batches' compute
    # (SGLang two-batch overlap order); "serial": each collective is waited right after
    # it starts (the baseline the overlap is measured against).
    mode: Literal["overlap", "serial"] = "overlap"
    # prefill chunks may be cut inside (SGLang splits extend batches by tokens); decode
    # chunks are always kept whole
    split_prefill: bool = True
    # cost of a token at position p is 1 + attention_weight * (p + 1); 0 balances tokens
    attention_weight: float = Field(0.0, ge=0.0)
