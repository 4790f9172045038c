"""Configuration of sagellm.cot: one frozen model per controller and for answer extraction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AdaptiveConsistencyConfig",
    "AnswerConfig",
    "DeerConfig",
    "EscConfig",
    "MajorityVoteConfig",
    "ThinkingBudgetConfig",
]

_STRICT = ConfigDict(frozen=True, extra="forbid")


class AnswerConfig(BaseModel):
    """How an answer is read out of a sample's text (for voting)."""

    model_config = _STRICT

    # last_number / first_number: a decimal number (commas and trailing zeros dropped);
    # boxed: the content of the last \boxed{...}; regex: group 1 (or the whole match) of the
    # last match of ``pattern``; text: the whole scope, stripped.
    method: Literal["last_number", "first_number", "boxed", "regex", "text"] = "last_number"
    pattern: str | None = None  # the regular expression of method "regex"
    # search only after the last occurrence of this string ("</think>", "answer is");
    # a sample without it has no answer
    marker: str | None = None
    lowercase: bool = True  # compare text answers case-insensitively

    @model_validator(mode="after")
    def _pattern_for_regex(self) -> AnswerConfig:
        if self.method == "regex" and not self.pattern:
            raise ValueError("method 'regex' needs a pattern, e.g. pattern='answer: (\\\\w+)'")
        return self


class _Markers(BaseModel):
    """Reasoning markers as token ids (the engine tokenizes the configured strings)."""

    model_config = _STRICT

    answer: AnswerConfig = AnswerConfig()  # how a sample's answer is read (for votes)

    # tokens that open the reasoning; empty: the reasoning is open from the first token
    start_token_ids: tuple[int, ...] = ()
    end_token_ids: tuple[int, ...] = Field(min_length=1)  # tokens that close the reasoning


class ThinkingBudgetConfig(_Markers):
    """vLLM's ``thinking_token_budget``: at most ``budget`` tokens between the markers."""

    budget: int = Field(ge=0)  # reasoning tokens allowed; the end marker is forced after them


class DeerConfig(_Markers):
    """DEER's early exit: at a transition phrase, a confident trial answer ends reasoning."""

    # token sequences after which a trial answer is tried ("Wait", " Alternatively", ...)
    transition_token_ids: tuple[tuple[int, ...], ...] = Field(min_length=1)
    # appended to the reasoning for the trial branch (e.g. end marker + "Final answer:")
    answer_prompt_token_ids: tuple[int, ...] = Field(min_length=1)
    probe_max_tokens: int = Field(16, ge=1, le=256)  # trial-answer length
    # the trial answer ends at the first of these (they and what follows are not scored)
    answer_stop_token_ids: tuple[int, ...] = ()
    threshold: float = Field(0.95, gt=0.0, le=1.0)  # confidence that ends the reasoning
    # mean: DEER's mean token probability of the trial answer; min: its least likely token
    confidence: Literal["mean", "min"] = "mean"
    max_probes: int = Field(8, ge=1)  # trial answers per request at most
    min_reasoning_tokens: int = Field(0, ge=0)  # no trial before this many reasoning tokens


class MajorityVoteConfig(BaseModel):
    """Plain self-consistency: every planned sample, then the majority."""

    model_config = _STRICT

    answer: AnswerConfig = AnswerConfig()  # how a sample's answer is read


class EscConfig(BaseModel):
    """Early-stopping self-consistency: stop once a whole window agrees."""

    model_config = _STRICT

    window: int = Field(4, ge=1, le=128)  # the latest samples that must agree
    answer: AnswerConfig = AnswerConfig()  # how a sample's answer is read


class AdaptiveConsistencyConfig(BaseModel):
    """Adaptive-Consistency's Beta rule: stop once the leader is likely the true mode."""

    model_config = _STRICT

    threshold: float = Field(0.95, gt=0.5, lt=1.0)  # P(p_leader > p_runner_up) that stops
    min_samples: int = Field(1, ge=1)  # never stop before this many samples
    answer: AnswerConfig = AnswerConfig()  # how a sample's answer is read
