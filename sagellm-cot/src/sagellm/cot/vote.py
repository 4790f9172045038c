"""Votes over sample answers: the plain majority and the shared counting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from sagellm.core.types import CoTStep, CoTVote
from sagellm.cot.answers import AnswerExtractor
from sagellm.cot.config import MajorityVoteConfig

__all__ = ["MajorityVote", "check_planned", "majority_vote", "tally"]


def check_planned(num_planned: int) -> None:
    """Raise ValueError for a request that plans no sample."""
    if num_planned < 1:
        raise ValueError(f"num_planned is {num_planned}: a request draws at least one sample")


def tally(answers: Sequence[str | None]) -> list[tuple[str, int]]:
    """(answer, votes) by votes, most first; ties in the order answers first appeared.

    Samples without an answer (``None``) do not vote.
    """
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    # dicts keep first-seen order and sorted() is stable
    return sorted(counts.items(), key=lambda kv: -kv[1])


def majority_vote(answers: Sequence[str | None], num_planned: int) -> CoTVote:
    """The majority answer; stops only when every planned sample is in."""
    check_planned(num_planned)
    ranked = tally(answers)
    answer, votes = ranked[0] if ranked else (None, 0)
    n = len(answers)
    return CoTVote(
        stop=n >= num_planned,
        answer=answer,
        num_samples=n,
        num_votes=votes,
        confidence=votes / n if n else 0.0,
    )


class MajorityVote:
    """Self-consistency without early stopping: the full-budget vote."""

    config_class: ClassVar[type[MajorityVoteConfig]] = MajorityVoteConfig

    def __init__(self, config: MajorityVoteConfig | None = None) -> None:
        self.config = config or MajorityVoteConfig()
        self._extract = AnswerExtractor(self.config.answer)

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

    def extract_answer(self, text: str) -> str | None:
        """The answer ``text`` votes for, read as ``config.answer`` says."""
        return self._extract(text)

    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        """Majority over all samples; stops when every planned one is in."""
        return majority_vote(answers, num_planned)
