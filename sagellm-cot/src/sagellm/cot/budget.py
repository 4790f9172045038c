"""A thinking budget: the end-of-reasoning marker is forced once the budget is spent.

Anchor: vLLM's per-request ``thinking_token_budget`` with configurable reasoning start and
end strings (``v1/sample/thinking_budget_state.py``), which forces the end tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from sagellm.core.types import CoTStep, CoTVote
from sagellm.cot._tokens import ReasoningSpan
from sagellm.cot.answers import AnswerExtractor
from sagellm.cot.config import ThinkingBudgetConfig
from sagellm.cot.vote import majority_vote

__all__ = ["ThinkingBudgetController"]


class ThinkingBudgetController:
    """Caps the reasoning of each request at ``budget`` tokens.

    Usage::

        ctl = ThinkingBudgetController(ThinkingBudgetConfig(budget=64, start_token_ids=(7,),
                                                            end_token_ids=(8,)))
        ctl.start("r1", prompt_ids)
        step = ctl.step("r1", generated_ids)   # CoTStep(forced_token_ids=(8,)) when spent

    The reasoning is what lies between the start marker (or the prompt's open marker, or
    the first token when no start marker is configured) and the end marker; it never holds
    more than ``budget`` tokens. When the model has already begun the end marker at the
    moment the budget runs out, only its missing tokens are forced.
    """

    config_class: ClassVar[type[ThinkingBudgetConfig]] = ThinkingBudgetConfig

    def __init__(self, config: ThinkingBudgetConfig) -> None:
        self.config = config
        self._extract = AnswerExtractor(config.answer)
        self._spans: dict[str, ReasoningSpan] = {}
        self.num_forced = 0  # requests whose end marker was forced

    def start(self, request_id: str, prompt_token_ids: Sequence[int]) -> CoTStep | None:
        """Begin tracking a request; forces the end marker at once for a spent budget."""
        if request_id in self._spans:
            raise ValueError(f"request {request_id!r} is already started; finish it first")
        cfg = self.config
        span = ReasoningSpan(cfg.start_token_ids, cfg.end_token_ids, prompt_token_ids)
        self._spans[request_id] = span
        return self._check(span, ())

    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        """Force the (rest of the) end marker when the reasoning reached the budget."""
        span = self._spans.get(request_id)
        if span is None:
            raise KeyError(f"request {request_id!r} was not started")
        span.advance(token_ids)
        return self._check(span, token_ids)

    def observe_probe(
        self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float]
    ) -> CoTStep | None:
        """A budget asks for no trial branches."""
        return None

    def finish(self, request_id: str) -> None:
        """Forget the request."""
        self._spans.pop(request_id, None)

    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        """Plain majority once every planned sample is in."""
        return majority_vote(answers, num_planned)

    def extract_answer(self, text: str) -> str | None:
        """The answer ``text`` votes for, read as ``config.answer`` says."""
        return self._extract(text)

    def make_stats(self) -> dict[str, int]:
        """Requests whose end marker was forced since the last call (counter reset)."""
        stats = {"num_forced": self.num_forced, "num_live": len(self._spans)}
        self.num_forced = 0
        return stats

    def _check(self, span: ReasoningSpan, token_ids: Sequence[int]) -> CoTStep | None:
        if not span.think_open or span.num_reasoning_tokens < self.config.budget:
            return None
        end = self.config.end_token_ids
        have = span.pending_end_prefix(token_ids)
        self.num_forced += 1
        return CoTStep(forced_token_ids=end[have:], reason="budget")
