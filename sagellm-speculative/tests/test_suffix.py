"""Suffix trees: counts against brute force, exact removal, drafts from both trees."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.core.types import DraftRequest
from sagellm.speculative import SuffixConfig, SuffixProposer, SuffixTree

seqs = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=5)


def _brute_counts(sequences: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for s in sequences:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + depth) + 1):
                key = tuple(s[i:j])
                counts[key] = counts.get(key, 0) + 1
    return counts


@settings(max_examples=200, deadline=None)
@given(sequences=seqs, depth=st.integers(1, 6))
def test_counts_every_substring_up_to_the_depth(sequences: list[list[int]], depth: int) -> None:
    tree = SuffixTree(depth)
    for s in sequences:
        tree.add(s)
    assert dict(tree.paths()) == _brute_counts(sequences, depth)
    assert tree.root.count == sum(len(s) for s in sequences)


@settings(max_examples=200, deadline=None)
@given(sequences=seqs, depth=st.integers(1, 6), data=st.data())
def test_remove_undoes_add_exactly(
    sequences: list[list[int]], depth: int, data: st.DataObject
) -> None:
    tree = SuffixTree(depth)
    for s in sequences:
        tree.add(s)
    drop = data.draw(st.sets(st.integers(0, len(sequences) - 1)))
    for i in sorted(drop):
        tree.remove(sequences[i])
    kept = [s for i, s in enumerate(sequences) if i not in drop]
    assert dict(tree.paths()) == _brute_counts(kept, depth)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=30), cut=st.integers(0, 30), depth=st.integers(1, 6)
)
def test_extend_in_pieces_equals_add(tokens: list[int], cut: int, depth: int) -> None:
    grown = SuffixTree(depth)
    grown.extend(tokens[:cut])
    grown.extend(tokens[cut:])
    whole = SuffixTree(depth)
    whole.add(tokens)
    assert dict(grown.paths()) == dict(whole.paths())
    assert grown.num_tokens == len(tokens)


def test_remove_of_an_absent_sequence_is_refused() -> None:
    tree = SuffixTree(4)
    tree.add([1, 2, 3])
    with pytest.raises(ValueError, match="not added"):
        tree.remove([1, 2, 4])
    assert dict(tree.paths()) == _brute_counts([[1, 2, 3]], 4)


def test_draft_follows_the_most_frequent_continuation() -> None:
    tree = SuffixTree(8)
    tree.add([1, 2, 3, 4])
    tree.add([1, 2, 3, 5])
    tree.add([1, 2, 3, 5])
    tokens, score = tree.draft([0, 1, 2], 3)
    assert tokens == (3, 5)
    assert score == pytest.approx(1.0 + 2 / 3)
    # a frequency floor stops at the uncertain branch
    assert tree.draft([0, 1, 2], 3, min_token_prob=0.7) == ((3,), 1.0)
    assert tree.draft([9], 3) == ((), 0.0)


def test_docstring_examples() -> None:
    tree = SuffixTree(max_depth=4)
    tree.add([1, 2, 3, 1, 2, 4])
    assert tree.count([1, 2]) == 2
    assert tree.draft([9, 1], num_tokens=2) == ((2, 3), 1.5)
    proposer = SuffixProposer(SuffixConfig(num_speculative_tokens=4))
    proposer.observe_finished("a", [1, 2], [7, 8, 9, 10, 11])
    [draft] = proposer.propose([DraftRequest("b", [3, 4], [7, 8], 4)])
    assert draft.token_ids == (9, 10, 11)


def test_global_tree_keeps_only_recent_outputs() -> None:
    proposer = SuffixProposer(SuffixConfig(num_speculative_tokens=3, max_cached_requests=2))
    proposer.observe_finished("a", [0], [20, 21, 22, 23])
    proposer.observe_finished("b", [0], [30, 31, 32, 33])
    [d] = proposer.propose([DraftRequest("x", [5], [20], 3)])
    assert d.token_ids == (21, 22, 23)
    proposer.observe_finished("c", [0], [40, 41, 42, 43])  # "a" falls out
    [d] = proposer.propose([DraftRequest("y", [5], [20], 3)])
    assert d.token_ids == ()
    [d] = proposer.propose([DraftRequest("z", [5], [40], 3)])
    assert d.token_ids == (41, 42, 43)
    assert dict(proposer.global_tree.paths()) == _brute_counts(
        [[30, 31, 32, 33], [40, 41, 42, 43]], proposer.config.max_tree_depth
    )


def test_request_tree_grows_with_the_output_and_is_dropped_on_finish() -> None:
    proposer = SuffixProposer(SuffixConfig(num_speculative_tokens=4))
    prompt = [1, 2, 3]
    out = [50, 51, 52, 53, 50]
    [d] = proposer.propose([DraftRequest("r", prompt, out, 4)])
    # the output repeats itself; the newest token (50) is not stored yet, so the path ends
    # where the stored tokens end
    assert d.token_ids == (51, 52, 53)
    assert proposer.num_live_requests == 1
    proposer.observe_finished("r", prompt, out)
    assert proposer.num_live_requests == 0


def test_request_tree_beats_a_weaker_global_path() -> None:
    proposer = SuffixProposer(SuffixConfig(num_speculative_tokens=2, min_token_prob=0.0))
    proposer.observe_finished("g1", [0], [7, 1])
    proposer.observe_finished("g2", [0], [7, 2])
    # the global tree says 7 -> 1 or 2 (p=0.5 each, score 0.5); the request's own tokens
    # say 7, 9, 7 -> 9 (score 1), and the stored tokens end there
    [d] = proposer.propose([DraftRequest("r", [7, 9, 7, 9], [7], 2)])
    assert d.token_ids == (9,)
    [d] = proposer.propose([DraftRequest("s", [5], [7], 2)])
    assert d.token_ids == (1,)
