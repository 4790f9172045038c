"""Draft tokens in the FCFS step: the budget, block allocation and rollback."""

from __future__ import annotations

import pytest

from sagellm.core.types import GenerationRequest
from sagellm.scheduler_ir import FCFSScheduler, FCFSSchedulerConfig
from sagellm.scheduler_ir.sim import BlockLedger

from .conftest import DictPrefixIndex


def _req(rid: str, n: int, start: int = 100) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(range(start, start + n)))


def _decoding(pool: BlockLedger, *, budget: int = 16, model_len: int = 64, index=None):
    """A scheduler with request "a" (6 prompt tokens) past its prefill: tokens 100..105 + 7."""
    cfg = FCFSSchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    s = FCFSScheduler(cfg, kv_pool=pool, max_model_len=model_len, prefix_index=index)
    s.add_request(_req("a", 6))
    while True:  # prefill in budget-sized chunks until the first token is sampled
        out = s.schedule()
        (c,) = out.chunks
        s.update_from_output(out, {"a": [7]} if c.sample else {})
        if c.sample:
            return s


def test_drafts_extend_the_decode_chunk_and_count_in_the_budget(pool: BlockLedger) -> None:
    s = _decoding(pool)
    s.set_draft_tokens({"a": [8, 9, 10]})
    out = s.schedule()
    (c,) = out.chunks
    assert (c.token_ids, c.num_computed_tokens, c.num_draft_tokens) == ((7, 8, 9, 10), 6, 3)
    assert c.block_ids == (0, 1, 2)  # positions 6..9 reach the third block
    assert out.num_scheduled_tokens == 4
    (seq,) = s.build_plan(out).compute_chunks
    assert seq.num_logits == 4


def test_accepting_some_drafts_rolls_back_the_rest(pool: BlockLedger) -> None:
    s = _decoding(pool)
    s.set_draft_tokens({"a": [8, 9, 10, 11, 12]})
    out = s.schedule()
    assert out.chunks[0].block_ids == (0, 1, 2)
    # drafts 8, 9 accepted, then the target's own 30: 100..105 7 8 9 30
    s.update_from_output(out, {"a": [8, 9, 30]})
    state = s.get_request("a")
    assert state.token_ids == [*range(100, 106), 7, 8, 9, 30]
    assert state.num_computed_tokens == 9  # KV of 7, 8, 9; 30 is computed next step
    assert state.block_ids == [0, 1, 2]
    out = s.schedule()
    (c,) = out.chunks
    assert (c.token_ids, c.num_computed_tokens, c.num_draft_tokens) == ((30,), 9, 0)


def test_emptied_blocks_go_back_to_the_pool(pool: BlockLedger) -> None:
    s = _decoding(pool)  # 7 tokens: blocks 0, 1
    s.set_draft_tokens({"a": [8, 9, 10, 11, 12, 13]})
    out = s.schedule()
    assert out.chunks[0].block_ids == (0, 1, 2, 3)  # positions up to 12
    free_before = pool.num_free_blocks
    s.update_from_output(out, {"a": [40]})  # nothing accepted
    state = s.get_request("a")
    assert state.block_ids == [0, 1]  # 8 tokens fit two blocks
    assert pool.num_free_blocks == free_before + 2


def test_drafts_respect_budget_and_context(pool: BlockLedger) -> None:
    s = _decoding(pool, budget=3)
    s.set_draft_tokens({"a": [8, 9, 10, 11]})
    assert s.schedule().chunks[0].num_draft_tokens == 2
    s = _decoding(BlockLedger(16, 4), model_len=10)
    s.set_draft_tokens({"a": [8, 9, 10, 11]})
    # 7 tokens known; the bonus after the last draft must fit in 10 positions
    assert s.schedule().chunks[0].num_draft_tokens == 2


def test_unscheduled_drafts_are_dropped(pool: BlockLedger) -> None:
    s = _decoding(pool)
    s.set_draft_tokens({"a": [8, 9], "unknown": [1]})
    out = s.schedule()
    s.update_from_output(out, {"a": [8, 9, 3]})
    out = s.schedule()
    assert out.chunks[0].num_draft_tokens == 0


def test_drafts_never_preempt(pool: BlockLedger) -> None:
    tight = BlockLedger(num_blocks=2, block_size=4)
    s = _decoding(tight)  # two blocks hold 7 tokens + 1
    s.set_draft_tokens({"a": [8, 9, 10]})
    out = s.schedule()
    (c,) = out.chunks
    assert (c.num_draft_tokens, out.preempted_request_ids) == (0, ())


def test_a_bad_emission_is_refused(pool: BlockLedger) -> None:
    s = _decoding(pool)
    s.set_draft_tokens({"a": [8, 9]})
    out = s.schedule()
    with pytest.raises(ValueError, match="not an accepted prefix"):
        s.update_from_output(out, {"a": [9, 9]})


def test_prefix_index_sees_only_accepted_tokens(pool: BlockLedger) -> None:
    index = DictPrefixIndex(4)
    s = _decoding(pool, index=index)
    s.set_draft_tokens({"a": [8, 9, 10, 11, 12]})
    out = s.schedule()
    s.update_from_output(out, {"a": [50]})  # every draft rejected
    # only block 0 (100..103) is full of computed tokens; block 1 holds 104, 105, 7 and
    # the KV of rejected draft 8, so it is not offered
    assert sorted(k[1] for k in index._blocks) == [(100, 101, 102, 103)]
    out = s.schedule()  # computes 50 into position 7, overwriting the rejected draft's slot
    s.update_from_output(out, {"a": [51]})
    assert sorted(k[1] for k in index._blocks) == [
        (100, 101, 102, 103),
        (100, 101, 102, 103, 104, 105, 7, 50),
    ]
