"""The CoTController suite passes a small reference controller and fails broken variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from sagellm.core.protocols import CoTController
from sagellm.core.testing import CoTControllerConformance
from sagellm.core.types import CoTStep, CoTVote


class CapConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CapController:
    """Forces token 1 after every 4 generated tokens; votes by majority, first seen wins."""

    config_class: ClassVar[type[BaseModel]] = CapConfig

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def start(self, request_id: str, prompt_token_ids: Sequence[int]) -> CoTStep | None:
        if request_id in self.seen:
            raise ValueError(f"{request_id} already started")
        self.seen[request_id] = 0
        return None

    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        if request_id not in self.seen:
            raise KeyError(request_id)
        if len(token_ids) % 4 == 0:
            return CoTStep(forced_token_ids=(1,), reason="cap")
        return None

    def observe_probe(
        self, request_id: str, token_ids: Sequence[int], logprobs: Sequence[float]
    ) -> CoTStep | None:
        return None

    def finish(self, request_id: str) -> None:
        self.seen.pop(request_id, None)

    def extract_answer(self, text: str) -> str | None:
        return text.strip() or None

    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        if num_planned < 1:
            raise ValueError("num_planned must be at least 1")
        counts: dict[str, int] = {}
        for a in answers:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        best = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
        return CoTVote(
            stop=len(answers) >= num_planned,
            answer=best[0],
            num_samples=len(answers),
            num_votes=best[1],
        )


class TestReferencePasses(CoTControllerConformance):
    max_examples = 20

    def make_controller(self) -> CoTController:
        return CapController()


class NeverStops(CapController):
    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        vote = super().vote(answers, num_planned)
        return CoTVote(False, vote.answer, vote.num_samples, vote.num_votes)


class ForcesForever(CapController):
    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        return CoTStep(forced_token_ids=(1,))


class ForcesOutsideTheVocabulary(CapController):
    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        return CoTStep(forced_token_ids=(10_000,))


class SharesState(CapController):
    def step(self, request_id: str, token_ids: Sequence[int]) -> CoTStep | None:
        # counts every request's calls together
        self.seen["all"] = self.seen.get("all", 0) + 1
        return CoTStep(forced_token_ids=(1,)) if self.seen["all"] % 5 == 0 else None


class VotesForTheMinority(CapController):
    def vote(self, answers: Sequence[str | None], num_planned: int) -> CoTVote:
        vote = super().vote(answers, num_planned)
        rare = min((a for a in answers if a is not None), key=answers.count, default=None)
        return CoTVote(vote.stop, rare, vote.num_samples, answers.count(rare) if rare else 0)


@pytest.mark.parametrize(
    ("broken", "test", "message"),
    [
        (NeverStops, "test_vote_contract", "must stop once every planned sample is in"),
        (ForcesForever, "test_random_streams_keep_the_step_contract", "forces without end"),
        (ForcesOutsideTheVocabulary, "test_random_streams_keep_the_step_contract", "outside"),
        (SharesState, "test_two_requests_do_not_share_state", "changed this one's tokens"),
        (VotesForTheMinority, "test_vote_contract", None),
    ],
)
def test_the_suite_catches_a_broken_controller(broken, test: str, message: str | None) -> None:
    class Suite(CoTControllerConformance):
        max_examples = 30

        def make_controller(self) -> CoTController:
            return broken()

    with pytest.raises(AssertionError, match=message):
        getattr(Suite(), test)()
