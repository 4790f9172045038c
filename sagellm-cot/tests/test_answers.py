"""Answer extraction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from sagellm.cot import AnswerConfig, AnswerExtractor, normalize_number


@pytest.mark.parametrize(
    ("config", "text", "answer"),
    [
        (AnswerConfig(), "3 apples and 4 more make 7.", "7"),
        (AnswerConfig(), "It costs $1,250.50 in total", "1250.5"),
        (AnswerConfig(), "no digits here", None),
        (AnswerConfig(method="first_number"), "3 apples and 4 more make 7.", "3"),
        (AnswerConfig(method="boxed"), r"so \boxed{\frac{1}{2}} and then", r"\frac{1}{2}"),
        (AnswerConfig(method="boxed"), r"\boxed{3} or rather \boxed{ 4.0 }", "4"),
        (AnswerConfig(method="boxed"), r"\boxed{3", None),
        (AnswerConfig(method="regex", pattern=r"answer is (\w+)"), "The answer is Paris.", "paris"),
        (AnswerConfig(method="regex", pattern=r"[A-D]\)"), "A) or B)", "b)"),
        (AnswerConfig(method="text", lowercase=False), "  Paris. ", "Paris"),
        (AnswerConfig(marker="</think>"), "I think 5 </think> it is 6", "6"),
        (AnswerConfig(marker="</think>"), "I think 5, unfinished", None),
        (AnswerConfig(method="text"), "   ", None),
    ],
)
def test_extraction(config: AnswerConfig, text: str, answer: str | None) -> None:
    assert AnswerExtractor(config)(text) == answer


def test_bad_patterns_say_what_to_do() -> None:
    with pytest.raises(ValidationError, match="method 'regex' needs a pattern"):
        AnswerConfig(method="regex")
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        AnswerExtractor(AnswerConfig(method="regex", pattern="(unclosed"))


@given(st.integers(-(10**9), 10**9))
def test_numbers_normalize_whatever_their_spelling(n: int) -> None:
    assert normalize_number(f"{n:,}") == str(n)
    assert normalize_number(f"{n}.000") == str(n)
    text = f"+{n}" if n >= 0 else str(n)
    assert AnswerExtractor()(f"the total is {text}.") == str(n)


def test_rules_extract_as_configured() -> None:
    from sagellm.cot import EarlyStoppingConsistency, EscConfig

    assert EarlyStoppingConsistency().extract_answer("2 and 3 make 5") == "5"
    rule = EarlyStoppingConsistency(EscConfig(answer=AnswerConfig(method="boxed")))
    assert rule.extract_answer(r"2 and 3 make \boxed{5} not 6") == "5"
