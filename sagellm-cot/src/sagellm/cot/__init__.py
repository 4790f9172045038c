"""sagellm.cot: chain-of-thought controllers (group ``sagellm.cot``).

Thinking budgets (vLLM's ``thinking_token_budget``), DEER-style early exit at transition
phrases, and self-consistency stopping rules (ESC's windows, Adaptive-Consistency's Beta
rule, the plain majority), with configurable answer extraction.

Usage::

    from sagellm.cot import EarlyStoppingConsistency, EscConfig, ThinkingBudgetController
    from sagellm.cot.config import ThinkingBudgetConfig

    budget = ThinkingBudgetController(ThinkingBudgetConfig(budget=256, end_token_ids=(8,)))
    budget.start("r1", prompt_ids)
    step = budget.step("r1", generated_ids)   # forces the end marker once 256 are spent

    esc = EarlyStoppingConsistency(EscConfig(window=4))
    esc.vote(["42", "42", "42", "42"], num_planned=16)   # CoTVote(stop=True, answer="42")
"""

from sagellm.cot._version import __version__
from sagellm.cot.answers import AnswerExtractor, normalize_number
from sagellm.cot.budget import ThinkingBudgetController
from sagellm.cot.config import (
    AdaptiveConsistencyConfig,
    AnswerConfig,
    DeerConfig,
    EscConfig,
    MajorityVoteConfig,
    ThinkingBudgetConfig,
)
from sagellm.cot.consistency import (
    AdaptiveConsistency,
    EarlyStoppingConsistency,
    beta_leader_probability,
)
from sagellm.cot.deer import DeerController, trial_confidence
from sagellm.cot.vote import MajorityVote, majority_vote, tally

__all__ = [
    "AdaptiveConsistency",
    "AdaptiveConsistencyConfig",
    "AnswerConfig",
    "AnswerExtractor",
    "DeerConfig",
    "DeerController",
    "EarlyStoppingConsistency",
    "EscConfig",
    "MajorityVote",
    "MajorityVoteConfig",
    "ThinkingBudgetConfig",
    "ThinkingBudgetController",
    "__version__",
    "beta_leader_probability",
    "majority_vote",
    "normalize_number",
    "tally",
    "trial_confidence",
]
