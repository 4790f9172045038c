"""Every controller passes core's CoTController conformance suite."""

from __future__ import annotations

from sagellm.core import registry
from sagellm.core.protocols import CoTController
from sagellm.core.testing import CoTControllerConformance
from sagellm.cot import (
    AdaptiveConsistency,
    DeerConfig,
    DeerController,
    EarlyStoppingConsistency,
    EscConfig,
    MajorityVote,
    ThinkingBudgetConfig,
    ThinkingBudgetController,
)


class TestBudgetConformance(CoTControllerConformance):
    def make_controller(self) -> CoTController:
        return ThinkingBudgetController(
            ThinkingBudgetConfig(budget=5, start_token_ids=(3,), end_token_ids=(4, 5))
        )


class TestOpenBudgetConformance(CoTControllerConformance):
    def make_controller(self) -> CoTController:
        return ThinkingBudgetController(ThinkingBudgetConfig(budget=0, end_token_ids=(4,)))


class TestDeerConformance(CoTControllerConformance):
    def make_controller(self) -> CoTController:
        return DeerController(
            DeerConfig(
                start_token_ids=(3,),
                end_token_ids=(4,),
                transition_token_ids=((6,), (7, 8)),
                answer_prompt_token_ids=(4, 9),
                threshold=0.9,
            )
        )


class TestEscConformance(CoTControllerConformance):
    def make_controller(self) -> CoTController:
        return EarlyStoppingConsistency(EscConfig(window=3))


class TestAdaptiveConformance(CoTControllerConformance):
    def make_controller(self) -> CoTController:
        return AdaptiveConsistency()


class TestMajorityConformance(CoTControllerConformance):
    def make_controller(self) -> CoTController:
        return MajorityVote()


def test_entry_points_build_every_controller() -> None:
    names = {p.name for p in registry.available("sagellm.cot")}
    assert names == {"thinking_budget", "deer", "esc", "adaptive", "majority"}
    esc = registry.load("sagellm.cot", "esc", {"window": 2})
    assert isinstance(esc, EarlyStoppingConsistency) and esc.config.window == 2
    budget = registry.load("sagellm.cot", "thinking_budget", {"budget": 3, "end_token_ids": [9]})
    assert isinstance(budget, ThinkingBudgetController) and budget.config.end_token_ids == (9,)
