"""asv benchmarks of sagellm.cot, side by side with the full-budget vote in the same run.

The self-consistency suites draw seeded synthetic answer streams (each sample answers
right with probability ``p``, otherwise one of a few wrong answers) and report, per rule,
the share of questions whose vote agrees with the full-budget majority and the share of
samples saved. The token-level suites time the controllers over long scripted reasonings.
"""

from __future__ import annotations

import math
import random

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
from sagellm.cot.simulate import ScriptedReasoner, generate, self_consistency

N, WINDOW, QUESTIONS = 16, 4, 400


def _streams(p: float, seed: int = 0) -> list[list[str | None]]:
    rng = random.Random(seed)
    out = []
    for _ in range(QUESTIONS):
        row: list[str | None] = []
        for _ in range(N):
            r = rng.random()
            row.append(
                "right" if r < p else (None if r < p + 0.05 else f"wrong{rng.randint(1, 3)}")
            )
        out.append(row)
    return out


def _compare(rule, streams, window: int) -> tuple[float, float]:
    agree = drawn = 0
    for row in streams:
        full, _ = self_consistency(MajorityVote(), row.__getitem__, N, N)
        vote, answers = self_consistency(rule, row.__getitem__, N, window)
        agree += vote.answer == full.answer
        drawn += len(answers)
    return agree / len(streams), 1 - drawn / (N * len(streams))


class SelfConsistencySuite:
    """Agreement with the full vote and samples saved, per rule and sample accuracy."""

    params = [0.5, 0.7, 0.9]
    param_names = ["p_right"]

    def setup(self, p: float) -> None:
        self.streams = _streams(p)

    def track_esc_agreement(self, p: float) -> float:
        return _compare(EarlyStoppingConsistency(EscConfig(window=WINDOW)), self.streams, WINDOW)[0]

    def track_esc_samples_saved(self, p: float) -> float:
        return _compare(EarlyStoppingConsistency(EscConfig(window=WINDOW)), self.streams, WINDOW)[1]

    def track_adaptive_agreement(self, p: float) -> float:
        return _compare(AdaptiveConsistency(), self.streams, 1)[0]

    def track_adaptive_samples_saved(self, p: float) -> float:
        return _compare(AdaptiveConsistency(), self.streams, 1)[1]

    def time_esc_over_all_questions(self, p: float) -> None:
        _compare(EarlyStoppingConsistency(EscConfig(window=WINDOW)), self.streams, WINDOW)


class TokenControllerSuite:
    """Per-token cost of the budget and DEER controllers over a 2,000-token reasoning."""

    def setup(self) -> None:
        rng = random.Random(0)
        reasoning = [3] + [rng.randint(10, 99) if rng.random() > 0.02 else 6 for _ in range(2000)]
        self.model = ScriptedReasoner(
            reasoning, [7, 8], (4,), 2, default_trial=([9], [math.log(0.5)])
        )

    def time_budget_1024(self) -> None:
        ctl = ThinkingBudgetController(
            ThinkingBudgetConfig(budget=1024, start_token_ids=(3,), end_token_ids=(4,))
        )
        generate(self.model, [ctl], [1], max_tokens=4096, eos_token_ids=[2])

    def time_no_controller(self) -> None:
        generate(self.model, [], [1], max_tokens=4096, eos_token_ids=[2])

    def time_deer(self) -> None:
        ctl = DeerController(
            DeerConfig(
                start_token_ids=(3,),
                end_token_ids=(4,),
                transition_token_ids=((6,),),
                answer_prompt_token_ids=(4, 5),
                max_probes=64,
            )
        )
        generate(self.model, [ctl], [1], max_tokens=4096, eos_token_ids=[2])

    def track_budget_reasoning_tokens(self) -> int:
        ctl = ThinkingBudgetController(
            ThinkingBudgetConfig(budget=1024, start_token_ids=(3,), end_token_ids=(4,))
        )
        trace = generate(self.model, [ctl], [1], max_tokens=4096, eos_token_ids=[2])
        return trace.token_ids.index(4) - 1
