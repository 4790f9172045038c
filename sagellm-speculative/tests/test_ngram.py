"""Prompt lookup: exact drafts, vLLM's option semantics, bad options."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sagellm.core.types import DraftRequest
from sagellm.speculative import NgramConfig, NgramProposer, find_ngram_draft


def test_longest_ngram_wins_over_a_shorter_earlier_match() -> None:
    # suffix 2,3 occurs at 1..2 (followed by 9) and 2,3 preceded by 1 at 5..7 (followed by 4)
    tokens = [0, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    assert find_ngram_draft(tokens, 1, 3, 3) == (4, 5, 1)
    assert find_ngram_draft(tokens, 1, 2, 3) == (9, 1, 2)  # n=2: earliest occurrence


def test_earliest_occurrence_is_used() -> None:
    tokens = [7, 1, 7, 2, 7]
    assert find_ngram_draft(tokens, 1, 1, 2) == (1, 7)


def test_min_length_excludes_short_matches() -> None:
    tokens = [1, 2, 3, 4, 3]
    assert find_ngram_draft(tokens, 1, 3, 2) == (4, 3)
    assert find_ngram_draft(tokens, 2, 3, 2) == ()


def test_draft_stops_at_the_context_end() -> None:
    assert find_ngram_draft([4, 5, 4], 1, 3, 5) == (5, 4)
    assert find_ngram_draft([4], 1, 3, 5) == ()
    assert find_ngram_draft([1, 2, 3], 1, 3, 5) == ()


def test_prompt_and_output_are_one_context() -> None:
    proposer = NgramProposer(NgramConfig(num_speculative_tokens=3, prompt_lookup_max=2))
    [d] = proposer.propose([DraftRequest("r", [8, 1, 2, 3, 4], [9, 1, 2], 5)])
    assert d.token_ids == (3, 4, 9)


def test_vllm_option_names_and_checks() -> None:
    cfg = NgramConfig(num_speculative_tokens=7, prompt_lookup_min=2, prompt_lookup_max=4)
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (7, 2, 4)
    with pytest.raises(ValidationError, match="set prompt_lookup_min <= prompt_lookup_max"):
        NgramConfig(prompt_lookup_min=4, prompt_lookup_max=2)
    with pytest.raises(ValidationError, match="num_speculative_tokens"):
        NgramConfig(num_speculative_tokens=0)


def _brute(tokens: list[int], lo: int, hi: int, k: int) -> tuple[int, ...]:
    for n in range(hi, lo - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n):
            if tokens[start : start + n] == suffix:
                return tuple(tokens[start + n : start + n + k])
    return ()


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), min_size=1, max_size=30),
    lo=st.integers(1, 3),
    extra=st.integers(0, 3),
    k=st.integers(0, 6),
)
def test_matches_a_brute_force_search(tokens: list[int], lo: int, extra: int, k: int) -> None:
    want = _brute(tokens, lo, lo + extra, k) if k else ()
    assert find_ngram_draft(tokens, lo, lo + extra, k) == want
