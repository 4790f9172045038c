"""The Proposer conformance suite accepts a correct proposer and catches broken ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from sagellm.core.testing import ProposerConformance
from sagellm.core.types import DraftRequest, SpeculativeDraft


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    num_speculative_tokens: int = 4


class RepeatLast:
    """Drafts the context's last token again and again (valid, if rarely right)."""

    config_class: ClassVar[type[BaseModel]] = _Options

    def __init__(self, config: _Options | None = None, **context: Any) -> None:
        self.config = config or _Options()

    @property
    def num_speculative_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        out = []
        for r in requests:
            k = min(r.num_tokens, self.num_speculative_tokens)
            out.append(SpeculativeDraft(r.request_id, (r.token_ids[-1],) * k))
        return out

    def observe_finished(
        self, request_id: str, prompt: Sequence[int], output: Sequence[int]
    ) -> None:
        pass


class OverBudget(RepeatLast):
    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        return [SpeculativeDraft(r.request_id, (1,) * 9) for r in requests]


class Reordered(RepeatLast):
    def propose(self, requests: Sequence[DraftRequest]) -> list[SpeculativeDraft]:
        return list(reversed(super().propose(requests)))


class TestRepeatLastConformance(ProposerConformance):
    copies_context = False

    def make_proposer(self, num_speculative_tokens: int) -> RepeatLast:
        return RepeatLast(_Options(num_speculative_tokens=num_speculative_tokens))


def _suite(cls: type[RepeatLast]) -> ProposerConformance:
    class Suite(ProposerConformance):
        copies_context = False
        max_examples = 10

        def make_proposer(self, num_speculative_tokens: int) -> RepeatLast:
            return cls(_Options(num_speculative_tokens=num_speculative_tokens))

    return Suite()


def test_a_proposer_that_ignores_the_budget_fails() -> None:
    with pytest.raises(AssertionError):
        _suite(OverBudget).test_budget_caps_the_draft()


def test_drafts_out_of_order_fail() -> None:
    with pytest.raises(AssertionError):
        _suite(Reordered).test_one_draft_per_request_in_order()


def test_a_proposer_that_copies_nothing_fails_the_copy_checks() -> None:
    suite = _suite(RepeatLast)
    type(suite).copies_context = True
    with pytest.raises(AssertionError):
        suite.test_context_copy_is_exact()
