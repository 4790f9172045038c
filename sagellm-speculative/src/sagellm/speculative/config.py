"""Configuration of sagellm.speculative: one frozen model per proposer, vLLM's spellings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["NgramConfig", "SpeculativeConfig", "SuffixConfig"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class NgramConfig(BaseModel):
    """Prompt lookup (vLLM's ``ngram`` method)."""

    model_config = _FROZEN

    num_speculative_tokens: int = Field(5, ge=1, le=16)  # k: drafts per request per step
    prompt_lookup_min: int = Field(1, ge=1)  # shortest suffix n-gram that may match
    prompt_lookup_max: int = Field(3, ge=1)  # longest suffix n-gram tried first

    @model_validator(mode="after")
    def _ordered(self) -> NgramConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min={self.prompt_lookup_min} is above prompt_lookup_max="
                f"{self.prompt_lookup_max}; set prompt_lookup_min <= prompt_lookup_max"
            )
        return self


class SuffixConfig(BaseModel):
    """Suffix trees over the request's tokens and recent outputs (SuffixDecoding)."""

    model_config = _FROZEN

    num_speculative_tokens: int = Field(8, ge=1, le=32)  # k: most drafts per request per step
    max_tree_depth: int = Field(24, ge=2, le=256)  # longest path stored (match + draft)
    max_cached_requests: int = Field(256, ge=0)  # finished outputs kept in the global tree
    min_token_prob: float = Field(0.1, ge=0.0, le=1.0)  # stop drafting below this frequency
    min_match_len: int = Field(1, ge=1)  # shortest context suffix that may match


class SpeculativeConfig(BaseModel):
    """What the engine takes as ``speculative_config`` (``--speculative-config`` JSON).

    ``method`` names a proposer of the ``sagellm.speculative`` group; the other keys that
    the proposer's own config knows are passed on to it, the engine's keys are kept here.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str = "ngram"  # proposer name: ngram, suffix, ...
    num_speculative_tokens: int = Field(5, ge=1, le=32)  # k
    disable_by_batch_size: int | None = Field(8, ge=1)  # no drafts at this many running
    # Switch off for a while when the acceptance rate of recent drafts stays below this.
    min_acceptance_rate: float = Field(0.2, ge=0.0, le=1.0)
    acceptance_window: int = Field(64, ge=1)  # draft tokens looked back over for that rate
    disabled_steps: int = Field(128, ge=1)  # steps without drafts before trying again

    def proposer_options(self) -> dict[str, Any]:
        """Options of the proposer: everything but the engine's own keys."""
        engine_keys = set(SpeculativeConfig.model_fields) - {"num_speculative_tokens"}
        data = self.model_dump()
        data.update(self.model_extra or {})
        return {k: v for k, v in data.items() if k not in engine_keys}
