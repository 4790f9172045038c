"""Self-consistency stopping rules, checked exactly on scripted answer streams."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.cot import (
    AdaptiveConsistency,
    AdaptiveConsistencyConfig,
    EarlyStoppingConsistency,
    EscConfig,
    MajorityVote,
    beta_leader_probability,
    tally,
)
from sagellm.cot.simulate import self_consistency


def stream(answers: list[str | None]):
    return lambda i: answers[i]


def test_esc_stops_after_the_first_unanimous_window() -> None:
    answers = ["7", "8", "7", "7", "7", "7", "7", "7"] + ["9"] * 8
    vote, drawn = self_consistency(
        EarlyStoppingConsistency(EscConfig(window=4)), stream(answers), 16, 4
    )
    assert len(drawn) == 8 and vote.stop and vote.answer == "7" and vote.num_votes == 7


def test_esc_with_a_missing_answer_does_not_stop() -> None:
    answers = ["7", "7", None, "7"] + ["7"] * 4 + ["1"] * 8
    vote, drawn = self_consistency(
        EarlyStoppingConsistency(EscConfig(window=4)), stream(answers), 16, 4
    )
    assert len(drawn) == 8 and vote.answer == "7"


def test_esc_draws_every_sample_when_no_window_agrees() -> None:
    answers = ["1", "2"] * 8
    vote, drawn = self_consistency(
        EarlyStoppingConsistency(EscConfig(window=4)), stream(answers), 16, 4
    )
    assert len(drawn) == 16 and vote.answer == "1" and vote.num_votes == 8  # tie: seen first


def test_esc_last_window_may_be_short() -> None:
    answers = ["1", "2", "3", "4", "5", "5"]
    vote, drawn = self_consistency(
        EarlyStoppingConsistency(EscConfig(window=4)), stream(answers), 6, 4
    )
    assert len(drawn) == 6 and vote.stop and vote.answer == "5"


def test_adaptive_beta_rule_exact_stopping_points() -> None:
    rule = AdaptiveConsistency(AdaptiveConsistencyConfig(threshold=0.95))
    # unanimous: 3 votes give 15/16 < 0.95, 4 give 31/32
    vote, drawn = self_consistency(rule, stream(["4"] * 16), 16, 1)
    assert len(drawn) == 4 and vote.confidence == pytest.approx(31 / 32)
    # one dissent: (5,1) gives P(Bin(7,1/2) <= 5) = 120/128 < .95, (6,1) gives 247/256
    vote, drawn = self_consistency(rule, stream(["4", "5"] + ["4"] * 14), 16, 1)
    assert len(drawn) == 7 and vote.answer == "4"
    assert vote.confidence == pytest.approx(247 / 256)


def test_adaptive_min_samples_and_windows() -> None:
    rule = AdaptiveConsistency(AdaptiveConsistencyConfig(min_samples=8))
    vote, drawn = self_consistency(rule, stream(["4"] * 16), 16, 1)
    assert len(drawn) == 8
    vote, drawn = self_consistency(AdaptiveConsistency(), stream(["4"] * 16), 16, 3)
    assert len(drawn) == 6  # checked after 3 (15/16) and after 6


def test_majority_draws_everything() -> None:
    vote, drawn = self_consistency(MajorityVote(), stream(["4"] * 16), 16, 4)
    assert len(drawn) == 16 and vote.answer == "4" and vote.confidence == 1.0


def test_rules_refuse_zero_planned_samples_and_windows() -> None:
    with pytest.raises(ValueError, match="num_planned is 0: a request draws at least one sample"):
        EarlyStoppingConsistency().vote([], 0)
    with pytest.raises(ValueError, match="window is 0"):
        self_consistency(MajorityVote(), stream(["1"]), 1, 0)


@settings(max_examples=200, deadline=None)
@given(leader=st.integers(0, 40), runner_up=st.integers(0, 40))
def test_beta_leader_probability_matches_the_beta_integral(leader: int, runner_up: int) -> None:
    # P(X > 1/2), X ~ Beta(a, b) integer: 1 - I_{1/2}(a, b); I_x(a,b) = sum_{j>=a} C(a+b-1,j) x^j (1-x)^(a+b-1-j)
    a, b = leader + 1, runner_up + 1
    m = a + b - 1
    cdf = sum(Fraction(comb(m, j), 2**m) for j in range(a, m + 1))
    assert beta_leader_probability(leader, runner_up) == pytest.approx(float(1 - cdf))
    if leader > runner_up:
        assert beta_leader_probability(leader, runner_up) > 0.5
    assert beta_leader_probability(leader, runner_up) == pytest.approx(
        1 - beta_leader_probability(runner_up, leader)
    )


@settings(max_examples=200, deadline=None)
@given(
    answers=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=32),
    window=st.integers(1, 8),
)
def test_esc_stops_no_later_than_the_full_vote_and_agrees_when_unanimous(answers, window) -> None:
    n = len(answers)
    full, _ = self_consistency(MajorityVote(), stream(answers), n, window)
    early, drawn = self_consistency(
        EarlyStoppingConsistency(EscConfig(window=window)), stream(answers), n, window
    )
    assert len(drawn) <= n and drawn == answers[: len(drawn)]
    assert full.num_samples == n
    if len(set(answers)) == 1 and answers[0] is not None:
        assert early.answer == full.answer == answers[0]
        assert len(drawn) == min(window, n)


def test_tally_orders_by_votes_then_first_seen() -> None:
    assert tally(["b", None, "a", "a", "b", "c"]) == [("b", 2), ("a", 2), ("c", 1)]
    assert tally([None, None]) == []
