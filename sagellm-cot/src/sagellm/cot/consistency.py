"""Self-consistency stopping rules: ESC's windows and Adaptive-Consistency's Beta rule.

Both vote by majority over every sample drawn so far (ties: the answer seen first); they
differ in when they stop drawing.

* ESC (Li et al., ICLR'24, "Escape Sky-high Cost"): samples come in windows; once all the
  answers of the latest window agree, no further window is drawn.
* Adaptive-Consistency (Aggarwal et al., EMNLP'23): with ``a`` votes for the leader and
  ``b`` for the runner-up, stop when ``P(p_leader > p_runner_up) >= threshold`` under a
  uniform prior, i.e. ``P(X > 1/2)`` for ``X ~ Beta(a + 1, b + 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from math import comb
from typing import ClassVar

from sagellm.core.types import CoTStep, CoTVote
from sagellm.cot.answers import AnswerExtractor
from sagellm.cot.config import AdaptiveConsistencyConfig, EscConfig
from sagellm.cot.vote import check_planned, tally

__all__ = ["AdaptiveConsistency", "EarlyStoppingConsistency", "beta_leader_probability"]


def beta_leader_probability(leader: int, runner_up: int) -> float:
    """``P(X > 1/2)`` for ``X ~ Beta(leader + 1, runner_up + 1)``, exactly.

    For integer parameters the Beta CDF is a binomial tail:
    ``I_x(a, b) = P(Binomial(a + b - 1, x) >= a)``, so with ``m = leader + runner_up + 1``
    the probability is ``P(Binomial(m, 1/2) <= leader)``.
    """
    if leader < 0 or runner_up < 0:
        raise ValueError("vote counts are never negative")
    m = leader + runner_up + 1
    hits = sum(comb(m, k) for k in range(leader + 1))
    return float(Fraction(hits, 2**m))


class _SampleLevel:
    """Shared no-op token hooks of the sample-level rules."""

    _extract: AnswerExtractor

    def extract_answer(self, text: str) -> str | None:
        """The answer ``text`` votes for, read as ``config.answer`` says."""
        return self._extract(text)

    def start(self, request_id: str, prompt_token_ids: Sequence[int]) -> CoTStep | None:
        """No token-level control."""
        return None

    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        """No token-level control."""
        return None

    def observe_probe(
        self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float]
    ) -> CoTStep | None:
        """No trial branches."""
        return None

    def finish(self, request_id: str) -> None:
        """Nothing is kept per request."""


class EarlyStoppingConsistency(_SampleLevel):
    """ESC: stop drawing once the latest ``window`` answers are one and the same.

    Usage::

        rule = EarlyStoppingConsistency(EscConfig(window=4))
        rule.vote(["7", "7", "7", "7"], num_planned=16).stop   # True
        rule.vote(["7", "7", None, "7"], num_planned=16).stop  # False: one had no answer
    """

    config_class: ClassVar[type[EscConfig]] = EscConfig

    def __init__(self, config: EscConfig | None = None) -> None:
        self.config = config or EscConfig()
        self._extract = AnswerExtractor(self.config.answer)

    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        """Majority so far; ``stop`` when the latest window agrees or all are in."""
        check_planned(num_planned)
        n = len(answers)
        ranked = tally(answers)
        answer, votes = ranked[0] if ranked else (None, 0)
        w = self.config.window
        latest = answers[-w:] if n >= w else ()
        agreed = bool(latest) and latest[0] is not None and len(set(latest)) == 1
        return CoTVote(
            stop=agreed or n >= num_planned,
            answer=answer,
            num_samples=n,
            num_votes=votes,
            confidence=votes / n if n else 0.0,
        )


class AdaptiveConsistency(_SampleLevel):
    """Adaptive-Consistency's Beta stopping rule over the two leading answers.

    Usage::

        rule = AdaptiveConsistency(AdaptiveConsistencyConfig(threshold=0.95))
        rule.vote(["7"] * 3, 16).stop   # False: P = 15/16
        rule.vote(["7"] * 4, 16).stop   # True:  P = 31/32
    """

    config_class: ClassVar[type[AdaptiveConsistencyConfig]] = AdaptiveConsistencyConfig

    def __init__(self, config: AdaptiveConsistencyConfig | None = None) -> None:
        self.config = config or AdaptiveConsistencyConfig()
        self._extract = AnswerExtractor(self.config.answer)

    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        """Majority so far; ``stop`` once the leader's posterior passes the threshold."""
        check_planned(num_planned)
        n = len(answers)
        ranked = tally(answers)
        answer, votes = ranked[0] if ranked else (None, 0)
        runner_up = ranked[1][1] if len(ranked) > 1 else 0
        p = beta_leader_probability(votes, runner_up) if ranked else 0.0
        confident = n >= self.config.min_samples and p >= self.config.threshold
        return CoTVote(
            stop=confident or n >= num_planned,
            answer=answer,
            num_samples=n,
            num_votes=votes,
            confidence=p,
        )
