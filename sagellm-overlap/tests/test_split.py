"""split_plan: exact cuts, exact errors, and hypothesis properties past the chunk count."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.core.testing.overlap import check_split, make_plan
from sagellm.core.types import ExecutionPlan, IRGraph, IRNode, IRNodeKind, SequenceChunk
from sagellm.overlap import (
    MicroBatchOverlap,
    OverlapConfig,
    chunk_cost,
    max_micro_batches,
    split_plan,
)


def _shape(parts: list[ExecutionPlan]) -> list[list[tuple[str, int, int, bool]]]:
    return [
        [(c.request_id, len(c.token_ids), c.start_position, c.sample) for c in p.compute_chunks]
        for p in parts
    ]


def test_a_prefill_chunk_is_cut_at_the_token_balance_point() -> None:
    # p0: 10 tokens from position 0, p1: 3 tokens from position 3; d0, d1: one token each
    plan = make_plan([(10, True, 1), (3, True, 1)], [1, 1])
    parts = split_plan(plan, 2)
    assert _shape(parts) == [
        [("p0", 7, 0, False)],
        [("p0", 3, 7, True), ("p1", 3, 3, True), ("d0", 1, 40, True), ("d1", 1, 41, True)],
    ]
    assert [[n.node_id for n in p.graph.nodes] for p in parts] == [[1], [1, 2, 3]]
    assert parts[0].request_ids == ("p0",)
    assert parts[1].request_ids == ("p0", "p1", "d0", "d1")
    assert parts[1].graph.node(3).inputs == (1, 2)
    # the piece keeps the chunk's block table
    assert parts[0].compute_chunks[0].block_ids == (0,)


def test_four_micro_batches_of_fifteen_tokens() -> None:
    plan = make_plan([(10, True, 1), (3, True, 1)], [1, 1])
    assert [sum(len(c.token_ids) for c in p.compute_chunks) for p in split_plan(plan, 4)] == [
        3,
        4,
        4,
        4,
    ]


def test_whole_prefill_chunks_cut_only_between_chunks() -> None:
    plan = make_plan([(10, True, 1), (3, True, 1)], [1, 1])
    parts = MicroBatchOverlap(OverlapConfig(split_prefill=False)).split(plan, 2)
    assert _shape(parts) == [
        [("p0", 10, 0, True)],
        [("p1", 3, 3, True), ("d0", 1, 40, True), ("d1", 1, 41, True)],
    ]


def test_sampled_positions_stay_in_the_last_piece() -> None:
    # 4 tokens, the last 3 of them verified (num_logits=3): the only cut is after token 1
    plan = make_plan([(4, True, 3)], [])
    assert max_micro_batches(plan) == 2
    (a, b) = split_plan(plan, 2)
    assert _shape([a, b]) == [[("p0", 1, 0, False)], [("p0", 3, 1, True)]]
    assert b.compute_chunks[0].num_logits == 3
    assert a.compute_chunks[0].num_logits == 1


def test_attention_weight_moves_the_cut_towards_the_cheap_end() -> None:
    plan = make_plan([(8, True, 1)], [])
    # token at position p costs 1 + (p + 1): [2..9]; sum 44; min-max cut after 5 tokens
    # ([2,3,4,5,6] = 20, [7,8,9] = 24) rather than after 6 ([27, 17]) or 4 ([14, 30])
    parts = split_plan(plan, 2, attention_weight=1.0)
    assert _shape(parts) == [[("p0", 5, 0, False)], [("p0", 3, 5, True)]]
    assert _shape(split_plan(plan, 2)) == [[("p0", 4, 0, False)], [("p0", 4, 4, True)]]


def test_chunk_cost() -> None:
    c = SequenceChunk("r", (1, 2, 3, 4), 10, (0,), True)
    assert chunk_cost(c, 0, 4, 0.0) == 4.0
    assert chunk_cost(c, 0, 4, 1.0) == 4 + 11 + 12 + 13 + 14
    assert chunk_cost(c, 1, 3, 0.5) == 2 + 0.5 * (12 + 13)


def test_migrations_go_first_and_transfers_last() -> None:
    plan = make_plan([(6, True, 1)], [1, 1], migrate=True, transfer=True)
    parts = split_plan(plan, 3)
    kinds = [[n.kind for n in p.graph.nodes] for p in parts]
    assert kinds[0][0] is IRNodeKind.KV_MIGRATE
    assert IRNodeKind.KV_MIGRATE not in kinds[1] + kinds[2]
    assert kinds[2][-1] is IRNodeKind.KV_TRANSFER
    assert IRNodeKind.KV_TRANSFER not in kinds[0] + kinds[1]
    # without the migration node the first-layer nodes lose that input
    assert parts[1].graph.nodes[0].inputs == ()


@pytest.mark.parametrize("n", [0, -3])
def test_fewer_than_one_micro_batch(n: int) -> None:
    with pytest.raises(ValueError, match=f"^num_micro_batches must be >= 1, got {n}$"):
        split_plan(make_plan([(3, True, 1)], []), n)


def test_more_micro_batches_than_the_plan_allows() -> None:
    plan = make_plan([(3, True, 1)], [2, 1])
    assert max_micro_batches(plan) == 5
    with pytest.raises(ValueError) as err:
        split_plan(plan, 6)
    assert str(err.value) == (
        "plan 7 can be cut into at most 5 non-empty micro-batches (3 sequence chunks, 2 of "
        "them kept whole, 6 tokens); got num_micro_batches=6"
    )


def test_a_plan_without_tokens_cannot_be_cut() -> None:
    plan = ExecutionPlan(1, IRGraph((IRNode(0, IRNodeKind.SAMPLE),)), ())
    assert split_plan(plan, 1) == [plan]
    with pytest.raises(ValueError, match=r"^plan 1 can be cut into at most 0 non-empty"):
        split_plan(plan, 2)


@settings(max_examples=150, deadline=None)
@given(
    prefill=st.lists(
        st.integers(1, 30).flatmap(
            lambda n: st.tuples(st.just(n), st.booleans(), st.integers(1, min(n, 4)))
        ),
        max_size=4,
    ),
    decode=st.lists(st.integers(1, 4), max_size=8),
    decode_first=st.booleans(),
    split_prefill=st.booleans(),
    data=st.data(),
)
def test_split_properties_up_to_the_limit(
    prefill: list[tuple[int, bool, int]],
    decode: list[int],
    decode_first: bool,
    split_prefill: bool,
    data: st.DataObject,
) -> None:
    if not prefill and not decode:
        decode = [1]
    plan = make_plan(prefill, decode, decode_first=decode_first, migrate=True, transfer=True)
    limit = max_micro_batches(plan, split_prefill)
    n = data.draw(st.integers(2, max(2, min(limit, 12))), label="n")
    if n > limit:
        with pytest.raises(ValueError, match=f"at most {limit} non-empty"):
            split_plan(plan, n, split_prefill=split_prefill)
        return
    parts = split_plan(plan, n, split_prefill=split_prefill)
    check_split(plan, parts, n)
    sizes = [sum(len(c.token_ids) for c in p.compute_chunks) for p in parts]
    # the largest piece that cannot be cut: a decode chunk, a kept-whole prefill chunk, or
    # the sampled tail of a cut one
    whole = (
        [len(c.token_ids) for c in plan.graph.of_kind(IRNodeKind.DECODE_BATCH)[0].chunks]
        if decode
        else []
    )
    for length, sample, k in prefill:
        whole.append((k if sample else 1) if split_prefill else length)
    assert max(sizes) <= sum(sizes) / n + max(whole), sizes
    if not split_prefill:
        for p in parts:
            for node in p.graph.of_kind(IRNodeKind.PREFILL_CHUNK):
                for c in node.chunks:
                    assert c.start_position % 3 == 0 and len(c.token_ids) in [x[0] for x in prefill]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.sampled_from([0.25, 1.0, 2.0, 3.0, 7.0]), min_size=2, max_size=8),
    data=st.data(),
)
def test_the_cut_points_minimise_the_largest_micro_batch(
    steps: list[float], data: st.DataObject
) -> None:
    # against every choice of cut points, exhaustively
    import itertools

    from sagellm.overlap.split import _best_cuts

    costs = [0.0]
    for x in steps:
        costs.append(costs[-1] + x)
    c = len(costs)
    n = data.draw(st.integers(2, c - 1), label="n")
    bounds = [0, *_best_cuts(costs, n)]
    assert bounds[-1] == c - 1 and all(a < b for a, b in zip(bounds, bounds[1:]))
    got = max(costs[b] - costs[a] for a, b in zip(bounds, bounds[1:]))
    best = min(
        max(costs[e] - costs[s] for s, e in zip((0, *cut), (*cut, c - 1)))
        for cut in itertools.combinations(range(1, c - 1), n - 1)
    )
    assert got == best
