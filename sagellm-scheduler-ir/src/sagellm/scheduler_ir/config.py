"""Configuration of the schedulers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FCFSSchedulerConfig"]


class FCFSSchedulerConfig(BaseModel):
    """Budgets of the first-come-first-served scheduler (vLLM's names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(64, ge=1)  # requests computed in one step
    max_num_batched_tokens: int = Field(2048, ge=1)  # token budget of one step
    long_prefill_token_threshold: int = Field(0, ge=0)  # cap of one request's chunk (0: none)
    enable_chunked_prefill: bool = True  # False: a prompt waits until it fits whole
