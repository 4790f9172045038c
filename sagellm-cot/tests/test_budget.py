"""The thinking budget, checked token by token with a scripted reasoner."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sagellm.core.types import CoTStep
from sagellm.cot import ThinkingBudgetConfig, ThinkingBudgetController
from sagellm.cot._tokens import ReasoningSpan
from sagellm.cot.simulate import ScriptedReasoner, generate

START, END, EOS = 3, 4, 2
REASONING = [START, 10, 11, 12, 13, 14, 15, 16]  # opens, then 7 reasoning tokens


def budget(n: int, *, start: tuple[int, ...] = (START,), end: tuple[int, ...] = (END,)):
    return ThinkingBudgetController(
        ThinkingBudgetConfig(budget=n, start_token_ids=start, end_token_ids=end)
    )


def model(**kw) -> ScriptedReasoner:
    return ScriptedReasoner(REASONING, [20, 21], (END,), EOS, **kw)


def test_the_end_marker_is_forced_after_exactly_the_budget() -> None:
    trace = generate(model(), [budget(3)], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [START, 10, 11, 12, END, 20, 21, EOS]
    assert trace.num_forced == 1 and trace.reasons == ["budget"]


def test_a_reasoning_within_the_budget_is_untouched() -> None:
    trace = generate(model(), [budget(8)], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [*REASONING, END, 20, 21, EOS]
    assert trace.num_forced == 0
    # a reasoning of exactly the budget: the marker is forced where the model put it
    trace = generate(model(), [budget(7)], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [*REASONING, END, 20, 21, EOS]
    assert trace.num_forced == 1


def test_budget_zero_closes_right_after_the_start_marker() -> None:
    trace = generate(model(), [budget(0)], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [START, END, 20, 21, EOS]


def test_a_prompt_that_opens_the_reasoning_counts_from_the_first_token() -> None:
    m = ScriptedReasoner([10, 11, 12, 13], [20], (END,), EOS)
    ctl = budget(0)
    assert ctl.start("r", [1, START]) == CoTStep(forced_token_ids=(END,), reason="budget")
    ctl.finish("r")
    trace = generate(m, [budget(2)], [1, START], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [10, 11, END, 20, EOS]


def test_a_prompt_with_a_closed_reasoning_is_not_counted() -> None:
    m = ScriptedReasoner([10, 11, 12], [20], (END,), EOS)
    trace = generate(m, [budget(1)], [START, 9, END], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [10, 11, 12, END, 20, EOS]  # no start marker in the output


def test_no_start_marker_means_open_from_the_first_token() -> None:
    m = ScriptedReasoner([10, 11, 12, 13], [20], (END,), EOS)
    trace = generate(m, [budget(2, start=())], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [10, 11, END, 20, EOS]


def test_a_begun_multi_token_end_marker_is_completed_not_repeated() -> None:
    # the model writes 10, 11, then the first half of the two-token end marker
    m = ScriptedReasoner([START, 10, 11, 40], [20], (40, 41), EOS)
    ctl = budget(3, end=(40, 41))
    trace = generate(m, [ctl], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [START, 10, 11, 40, 41, 20, EOS]
    assert trace.num_forced == 1


def test_a_multi_token_end_marker_is_forced_whole() -> None:
    m = ScriptedReasoner([START, 10, 11, 12, 13], [20], (40, 41), EOS)
    trace = generate(m, [budget(2, end=(40, 41))], [1], max_tokens=64, eos_token_ids=[EOS])
    assert trace.token_ids == [START, 10, 11, 40, 41, 20, EOS]
    assert trace.num_forced == 2


def test_step_before_start_and_double_start_say_what_to_do() -> None:
    ctl = budget(3)
    with pytest.raises(KeyError, match="'r' was not started"):
        ctl.step("r", [1])
    ctl.start("r", [1])
    with pytest.raises(ValueError, match="already started; finish it first"):
        ctl.start("r", [1])


def test_config_needs_an_end_marker_and_a_budget() -> None:
    with pytest.raises(ValidationError, match="end_token_ids"):
        ThinkingBudgetConfig(budget=3, end_token_ids=())
    with pytest.raises(ValidationError, match="budget"):
        ThinkingBudgetConfig(budget=-1, end_token_ids=(4,))


def test_stats_count_forced_requests_and_reset() -> None:
    ctl = budget(1)
    generate(model(), [ctl], [1], max_tokens=64, eos_token_ids=[EOS], request_id="a")
    generate(model(), [ctl], [1], max_tokens=64, eos_token_ids=[EOS], request_id="b")
    assert ctl.make_stats() == {"num_forced": 2, "num_live": 0}
    assert ctl.make_stats() == {"num_forced": 0, "num_live": 0}


def _reasoning_length(tokens: list[int], start: int, end: tuple[int, ...]) -> int | None:
    """Tokens between the first start marker and the following end marker."""
    if start not in tokens:
        return None
    s = tokens.index(start) + 1
    for i in range(s, len(tokens) - len(end) + 1):
        if tuple(tokens[i : i + len(end)]) == end:
            return i - s
    return len(tokens) - s  # still open


@settings(max_examples=150, deadline=None)
@given(
    reasoning=st.lists(st.integers(5, 12), max_size=40),
    n=st.integers(0, 20),
    two_token_end=st.booleans(),
)
def test_the_budget_is_never_exceeded(reasoning: list[int], n: int, two_token_end: bool) -> None:
    # tokens 5..12 may contain the end marker's own ids (5 and 6 for the two-token one)
    end = (5, 6) if two_token_end else (END,)
    m = ScriptedReasoner([START, *reasoning], [20], end, EOS)
    trace = generate(m, [budget(n, end=end)], [1], max_tokens=200, eos_token_ids=[EOS])
    length = _reasoning_length(trace.token_ids, START, end)
    assert length is not None and length <= n
    # and it closes: the answer follows
    assert trace.token_ids[-2:] == [20, EOS]


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(0, 6), max_size=30), cut=st.integers(0, 30))
def test_span_tracking_is_the_same_token_by_token_or_at_once(tokens: list[int], cut: int) -> None:
    a = ReasoningSpan((3,), (4, 5), [1])
    b = ReasoningSpan((3,), (4, 5), [1])
    a.advance(tokens)
    b.advance(tokens[:cut])
    b.advance(tokens)
    assert (a.opened, a.closed, a.num_reasoning_tokens) == (
        b.opened,
        b.closed,
        b.num_reasoning_tokens,
    )
