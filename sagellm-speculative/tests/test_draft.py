"""The draft-model and layer-skip proposers on a toy runtime whose model is known."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from speculative_toy_runtime import LAYERS, ToyPool, ToyRuntime, next_token

from sagellm.core.errors import ConfigError
from sagellm.core.types import DraftRequest
from sagellm.speculative import (
    DraftModelConfig,
    DraftModelProposer,
    LayerSkipConfig,
    LayerSkipProposer,
    calibrate_skip_layers,
)


def _greedy(context: list[int], k: int, skip: tuple[int, ...] = ()) -> tuple[int, ...]:
    out: list[int] = []
    for _ in range(k):
        out.append(next_token(context + out, skip))
    return tuple(out)


def _proposer(k: int = 4, num_blocks: int = 64, block_size: int = 4) -> DraftModelProposer:
    rt = ToyRuntime()
    return DraftModelProposer(
        DraftModelConfig(num_speculative_tokens=k, block_size=block_size),
        draft_runtime=rt,
        kv_pool=ToyPool(rt.kv_cache_schema(block_size), num_blocks),
    )


def test_drafts_are_the_draft_models_greedy_continuation() -> None:
    p = _proposer(k=4)
    reqs = [DraftRequest("a", [1, 2, 3], [4], 4), DraftRequest("b", [9, 9], [], 2)]
    drafts = p.propose(reqs)
    assert [d.request_id for d in drafts] == ["a", "b"]
    assert drafts[0].token_ids == _greedy([1, 2, 3, 4], 4)
    assert drafts[1].token_ids == _greedy([9, 9], 2)
    assert all(d.draft_probs is None for d in drafts)  # greedy: point masses
    # one prefill pass (both requests) and three decode passes (only "a" after the second)
    sizes = [[len(c.token_ids) for c in plan.compute_chunks] for plan in p.runtime.executed]
    assert sizes == [[4, 2], [1, 1], [1], [1]]


def test_a_rejected_draft_is_recomputed_and_accepted_kv_kept() -> None:
    p = _proposer(k=3)
    ctx = [7, 8, 9]
    [d] = p.propose([DraftRequest("r", ctx, [], 3)])
    # the target kept the first draft and then chose another token than the second
    other = (d.token_ids[1] + 1) % 64
    out = [d.token_ids[0], other]
    [d2] = p.propose([DraftRequest("r", ctx, out, 3)])
    assert d2.token_ids == _greedy(ctx + out, 3)
    # the second call started from the kept prefix: ctx + first draft were in the pool
    first = p.runtime.executed[3].compute_chunks[0]
    assert first.start_position == 4 and first.token_ids == (other,)


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.lists(st.integers(0, 63), min_size=1, max_size=12),
    turns=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 63)), min_size=1, max_size=8),
    k=st.integers(1, 5),
)
def test_drafts_stay_exact_over_any_acceptance_pattern(
    prompt: list[int], turns: list[tuple[int, int]], k: int
) -> None:
    """Whatever prefix of its drafts is accepted, the next drafts continue the true
    context, and finishing frees every block."""
    p = _proposer(k=k, num_blocks=64, block_size=4)
    out: list[int] = []
    for accepted, bonus in turns:
        [d] = p.propose([DraftRequest("r", prompt, out, k)])
        assert d.token_ids == _greedy(prompt + out, k)
        out += [*d.token_ids[: min(accepted, len(d.token_ids))], bonus]
    p.observe_finished("r", prompt, out)
    assert p.pool.num_free_blocks == 64


def test_a_full_pool_drops_the_least_recently_seen_request() -> None:
    p = _proposer(k=2, num_blocks=4, block_size=4)  # 16 positions in all
    p.propose([DraftRequest("old", [1] * 6, [], 2)])  # 7 positions: 2 blocks
    p.propose([DraftRequest("mid", [2] * 6, [], 2)])  # 2 blocks: the pool is full
    [d] = p.propose([DraftRequest("new", [3] * 6, [], 2)])  # "old" goes
    assert d.token_ids == _greedy([3] * 6, 2)
    assert set(p._states) == {"mid", "new"} and p.pool.num_free_blocks == 0
    # a request bigger than the whole pool gets no draft, and holds nothing
    [none] = p.propose([DraftRequest("huge", [4] * 40, [], 2)])
    assert none.token_ids == () and "huge" not in p._states


def test_requests_of_the_same_step_never_evict_each_other() -> None:
    p = _proposer(k=2, num_blocks=3, block_size=4)  # 12 positions in all
    a, b = DraftRequest("a", [1] * 6, [], 2), DraftRequest("b", [2] * 6, [], 2)
    da, db = p.propose([a, b])  # "a" takes 2 blocks; "b" needs 2 and finds 1
    assert da.token_ids == _greedy([1] * 6, 2) and db.token_ids == ()
    assert set(p._states) == {"a"} and p.pool.num_free_blocks == 1
    # in a later step "a" is the least recently seen one, and makes room for "b"
    [db] = p.propose([b])
    assert db.token_ids == _greedy([2] * 6, 2) and set(p._states) == {"b"}


def test_no_room_in_the_context_means_no_draft() -> None:
    p = _proposer(k=4)
    p.max_model_len = 10
    [d] = p.propose([DraftRequest("r", list(range(8)), [1], 4)])  # 9 of 10 positions used
    assert d.token_ids == _greedy(list(range(8)) + [1], 1)


def test_without_a_runtime_it_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match="runs its model through the engine's runtime"):
        DraftModelProposer(DraftModelConfig())


def test_runtime_options_must_be_fields_of_the_runtime_config() -> None:
    with pytest.raises(
        ConfigError, match=r"runtime_options \['bogus'\] are not fields of ToyConfig"
    ):
        DraftModelProposer(DraftModelConfig(runtime_options={"bogus": 1}), runtime=ToyRuntime())


def test_calibration_leaves_out_the_layers_that_cost_the_least_agreement() -> None:
    """The toy model's prediction moves by 7 * sum(skipped layers): skipping layer l keeps
    the tokens where the shift is a multiple of 64 — none for 1..3 — so every single
    layer scores 0 and ties go to the lowest indices; the calibration keeps the first and
    the last layer."""
    rt = ToyRuntime()

    def make_pool(runtime: ToyRuntime) -> ToyPool:
        pool = ToyPool(runtime.kv_cache_schema(16), 64)
        runtime.bind_kv_pool(pool)
        return pool

    tokens = list(range(40))
    skip, agreement = calibrate_skip_layers(rt, make_pool, 2, tokens)
    assert skip == (1, 2) and agreement == 0.0
    with pytest.raises(ConfigError, match="num_skip_layers=4: give 1 to 3"):
        calibrate_skip_layers(rt, make_pool, LAYERS - 1, tokens)


def test_layer_skip_drafts_with_the_given_layers_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    target = ToyRuntime()
    built: list[ToyRuntime] = []

    def fake_load(group: str, name: str, options: dict, **ctx):  # type: ignore[no-untyped-def]
        assert group == "kv_pool" and name == "paged"
        return ToyPool(ctx["schema"], options["num_blocks"])

    monkeypatch.setattr("sagellm.speculative.draft.registry.load", fake_load)
    p = LayerSkipProposer(
        LayerSkipConfig(num_speculative_tokens=3, skip_layers=(2, 3)), runtime=target
    )
    built.append(p.runtime)
    assert p.skip_layers == (2, 3) and p.runtime is not target
    assert p.runtime.config.skip_layers == (2, 3)
    [d] = p.propose([DraftRequest("r", [5, 6], [], 3)])
    assert d.token_ids == _greedy([5, 6], 3, skip=(2, 3))
