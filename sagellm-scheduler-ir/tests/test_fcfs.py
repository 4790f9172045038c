from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sagellm.core.errors import InvalidRequestError
from sagellm.core.protocols import Scheduler
from sagellm.core.types import FinishReason, GenerationRequest, IRNodeKind, SamplingParams
from sagellm.scheduler_ir import FCFSScheduler, FCFSSchedulerConfig
from sagellm.scheduler_ir.sim import BlockLedger

from .conftest import DictPrefixIndex


def req(rid: str, n: int, start: int = 100, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(range(start, start + n)), **kw)


def make(pool: BlockLedger, *, seqs: int = 8, budget: int = 16, model_len: int = 64, **kw):
    cfg = FCFSSchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, **kw)
    return FCFSScheduler(cfg, kv_pool=pool, max_model_len=model_len)


def step(sched: FCFSScheduler, token: int = 7):
    out = sched.schedule()
    sched.update_from_output(out, {c.request_id: [token] for c in out.chunks if c.sample})
    return out


def test_is_a_scheduler(pool):
    assert isinstance(make(pool), Scheduler)


def test_prefill_is_chunked_by_the_budget_then_decodes(pool):
    s = make(pool, budget=6)
    s.add_request(req("a", 10))
    out = step(s)
    (c,) = out.chunks
    assert (c.token_ids, c.num_computed_tokens, c.block_ids, c.sample, c.is_prefill) == (
        tuple(range(100, 106)),
        0,
        (0, 1),
        False,
        True,
    )
    out = step(s, token=55)
    (c,) = out.chunks
    assert (c.token_ids, c.num_computed_tokens, c.block_ids, c.sample) == (
        tuple(range(106, 110)),
        6,
        (0, 1, 2),
        True,
    )
    out = step(s)
    (c,) = out.chunks
    assert (c.token_ids, c.num_computed_tokens, c.sample, c.is_prefill) == ((55,), 10, True, False)
    assert out.num_scheduled_tokens == 1


def test_running_requests_come_first_and_budget_is_shared(pool):
    s = make(pool, budget=8)
    s.add_request(req("a", 5))
    step(s)  # a prefilled, decoding now
    s.add_request(req("b", 12, start=300))
    out = s.schedule()
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("b", 7), ("a", 1)]
    assert out.chunks[0].is_prefill and not out.chunks[1].is_prefill
    plan = s.build_plan(out)
    kinds = [n.kind for n in plan.graph.nodes]
    assert kinds == [IRNodeKind.PREFILL_CHUNK, IRNodeKind.DECODE_BATCH, IRNodeKind.SAMPLE]
    assert plan.graph.nodes[2].config["request_ids"] == ("a",)
    assert plan.graph.nodes[2].inputs == (0, 1)


def test_sequence_cap_keeps_requests_waiting(pool):
    s = make(pool, seqs=2, budget=64)
    for r in "abc":
        s.add_request(req(r, 3, start=ord(r) * 10))
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["a", "b"]
    assert (out.num_running, out.num_waiting) == (2, 1)


def test_without_chunked_prefill_a_prompt_waits_until_it_fits(pool):
    s = make(pool, budget=8, enable_chunked_prefill=False)
    s.add_request(req("a", 4))
    s.add_request(req("b", 6, start=200))
    out = s.schedule()
    assert [c.request_id for c in out.chunks] == ["a"]


def test_long_prefill_threshold_caps_one_chunk(pool):
    s = make(pool, budget=16, long_prefill_token_threshold=3)
    s.add_request(req("a", 8))
    assert [len(c.token_ids) for c in s.schedule().chunks] == [3]


def test_preemption_by_recompute_frees_the_last_request():
    pool = BlockLedger(num_blocks=4, block_size=4)
    s = make(pool, budget=64)
    s.add_request(req("a", 8))
    s.add_request(req("b", 8, start=200))
    out = step(s)  # a: blocks 0,1 ; b: blocks 2,3 ; both sample one token -> 9 tokens each
    assert [c.block_ids for c in out.chunks] == [(0, 1), (2, 3)]
    out = s.schedule()  # each needs a third block for position 8: b is preempted
    assert out.preempted_request_ids == ("b",)
    assert [(c.request_id, c.block_ids) for c in out.chunks] == [("a", (0, 1, 2))]
    assert (out.num_running, out.num_waiting) == (1, 1)
    assert s.get_request("b").num_computed_tokens == 0
    assert s.get_request("b").token_ids[-1] == 7  # its output token is kept
    s.update_from_output(out, {"a": [9]})
    s.finish_requests(["a"], FinishReason.STOP)
    out = s.schedule()
    (c,) = out.chunks
    assert (c.request_id, c.num_computed_tokens, len(c.token_ids), c.sample) == ("b", 0, 9, True)
    assert out.finished_request_ids == ("a",)


def test_abort_mid_prefill_returns_every_block(pool):
    s = make(pool, budget=4)
    s.add_request(req("a", 12))
    step(s)
    assert pool.num_free_blocks == 15
    s.finish_requests(["a"], FinishReason.ABORT)
    assert pool.num_free_blocks == 16
    assert not s.has_unfinished_requests()
    assert s.schedule().finished_request_ids == ("a",)


def test_errors_say_what_to_do(pool):
    s = make(pool, model_len=10)
    with pytest.raises(InvalidRequestError, match=r"has 10 tokens but the context holds 10"):
        s.add_request(req("a", 10))
    small = make(BlockLedger(num_blocks=2, block_size=4), model_len=64)
    with pytest.raises(InvalidRequestError, match=r"needs 3 KV blocks but the pool has 2"):
        small.add_request(req("a", 9))
    s.add_request(req("x", 3))
    with pytest.raises(InvalidRequestError, match=r"request id 'x' is already live"):
        s.add_request(req("x", 3))


def test_prefix_hits_skip_cached_blocks_and_are_isolated(pool):
    index = DictPrefixIndex(block_size=4)
    cfg = FCFSSchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    s = FCFSScheduler(cfg, kv_pool=pool, max_model_len=64, prefix_index=index)
    s.add_request(req("a", 10))
    step(s)  # computes 10 tokens: blocks 0,1 are full and indexed
    assert index.num_cached_blocks == 2
    assert [pool.ref_count(b) for b in (0, 1, 2)] == [2, 2, 1]
    s.add_request(req("b", 11))  # same first 10 tokens, one more
    s.add_request(req("c", 11, tenant="other"))
    out = s.schedule()
    chunks = {c.request_id: c for c in out.chunks}
    assert (chunks["b"].num_computed_tokens, chunks["b"].block_ids[:2]) == (8, (0, 1))
    assert chunks["b"].token_ids == (108, 109, 110)
    assert chunks["c"].num_computed_tokens == 0  # another tenant never shares
    s.update_from_output(out, {c.request_id: [1] for c in out.chunks if c.sample})
    s.finish_requests(["a", "b", "c"], FinishReason.STOP)
    # only the index's own references remain
    assert pool.num_free_blocks == 16 - index.num_cached_blocks
    index_blocks = index.clear()
    pool.free(index_blocks)
    assert pool.num_free_blocks == 16


def test_skip_prefix_cache_neither_matches_nor_indexes(pool):
    index = DictPrefixIndex(block_size=4)
    cfg = FCFSSchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    s = FCFSScheduler(cfg, kv_pool=pool, max_model_len=64, prefix_index=index)
    s.add_request(req("a", 10))
    for _ in range(3):  # 4 + 4 + 2 prompt tokens: blocks 0,1 full and indexed
        step(s)
    s.finish_requests(["a"], FinishReason.STOP)
    assert index.num_cached_blocks == 2 and pool.num_free_blocks == 14
    s.add_request(req("x", 10, skip_prefix_cache=True))  # the same prompt
    out = step(s)
    assert (out.chunks[0].num_computed_tokens, out.chunks[0].block_ids) == (0, (2,))
    for _ in range(3):  # the rest of the prompt, then one decode: 11 tokens, 2 full blocks
        step(s)
    assert s.get_request("x").num_computed_tokens == 11
    assert index.num_cached_blocks == 2 and pool.num_free_blocks == 11
    assert [pool.ref_count(b) for b in (2, 3, 4)] == [1, 1, 1]  # no index reference
    s.finish_requests(["x"], FinishReason.STOP)
    assert index.num_cached_blocks == 2 and pool.num_free_blocks == 14
    s.add_request(req("b", 10))  # a plain request still hits what "a" left
    assert s.schedule().chunks[0].num_computed_tokens == 8


def test_full_pool_evicts_prefix_blocks_before_preempting():
    pool = BlockLedger(num_blocks=4, block_size=4)
    index = DictPrefixIndex(block_size=4)
    cfg = FCFSSchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    s = FCFSScheduler(cfg, kv_pool=pool, max_model_len=64, prefix_index=index)
    s.add_request(req("a", 8))
    step(s)
    s.finish_requests(["a"], FinishReason.STOP)
    assert pool.num_free_blocks == 2  # blocks 0,1 held by the index
    s.add_request(req("b", 12, start=500))
    out = s.schedule()
    assert out.preempted_request_ids == ()
    # one block short: only the deepest cached block (1) is evicted, block 0 stays cached
    assert out.chunks[0].block_ids == (1, 2, 3)
    assert index.num_cached_blocks == 1


@settings(max_examples=30, deadline=None)
@given(
    lens=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    budget=st.integers(1, 24),
    num_blocks=st.integers(6, 24),
    out_len=st.integers(1, 6),
)
def test_random_workloads_finish_without_leaks(lens, budget, num_blocks, out_len):
    # As the engine does, the context is capped at what the pool holds (the engine's stop
    # checks end a sequence there); this test stops sequences itself, within that cap.
    max_model_len = min(64, 4 * num_blocks)
    assume(max(lens) + out_len - 1 <= max_model_len)
    pool = BlockLedger(num_blocks=num_blocks, block_size=4)
    index = DictPrefixIndex(block_size=4)
    cfg = FCFSSchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget)
    s = FCFSScheduler(cfg, kv_pool=pool, max_model_len=max_model_len, prefix_index=index)
    for i, n in enumerate(lens):
        s.add_request(req(f"r{i}", n, start=100 + (i % 2)))  # shared prefixes half the time
    generated = {f"r{i}": 0 for i in range(len(lens))}
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        assert out.num_scheduled_tokens <= budget
        s.update_from_output(out, {c.request_id: [3] for c in out.chunks if c.sample})
        done = []
        for c in out.chunks:
            if c.sample:
                generated[c.request_id] += 1
                if generated[c.request_id] == out_len:
                    done.append(c.request_id)
        s.finish_requests(done, FinishReason.LENGTH)
    assert not s.has_unfinished_requests()
    assert all(v == out_len for v in generated.values())
    pool.free(index.clear())
    assert pool.num_free_blocks == num_blocks


def test_stats_count_and_reset(pool):
    s = make(pool, budget=4)
    s.add_request(req("a", 6))
    step(s)
    st_ = s.make_stats()
    assert (st_.num_steps, st_.num_scheduled_tokens, st_.num_running) == (1, 4, 1)
    assert s.make_stats().num_steps == 0


def test_sampling_params_do_not_matter_to_scheduling(pool):
    s = make(pool)
    s.add_request(req("a", 3, sampling=SamplingParams(max_tokens=1, temperature=0)))
    assert s.schedule().chunks[0].sample


def test_ledger_rejects_a_bad_free_without_changing_anything():
    ledger = BlockLedger(num_blocks=4, block_size=4)
    assert ledger.allocate(2) == [0, 1]
    with pytest.raises(ValueError, match=r"block 0 is freed 2 time\(s\) but holds 1 reference"):
        ledger.free([1, 0, 0])
    with pytest.raises(ValueError, match=r"block 9 does not exist \(the ledger has 4\)"):
        ledger.free([9])
    assert (ledger.ref_count(0), ledger.ref_count(1), ledger.num_free_blocks) == (1, 1, 2)
    ledger.free([1, 0])
    assert ledger.allocate(4) == [1, 0, 2, 3]  # the first freed is handed out first


# ---------------------------------------------------------------------- prefilled requests


def test_prefilled_request_computes_only_its_last_prompt_token(pool):
    index = DictPrefixIndex(block_size=4)
    cfg = FCFSSchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    s = FCFSScheduler(cfg, kv_pool=pool, max_model_len=64, prefix_index=index)
    blocks = pool.allocate(3)  # KV of positions 0..9 arrived from another instance
    s.add_prefilled_request(req("a", 11), blocks, 10)
    out = step(s, token=42)
    (c,) = out.chunks
    assert (c.token_ids, c.num_computed_tokens, c.block_ids, c.sample, c.is_prefill) == (
        (110,),
        10,
        (0, 1, 2),
        True,
        False,
    )
    assert out.num_scheduled_tokens == 1
    assert s.make_stats().num_external_tokens == 10
    assert index.num_cached_blocks == 2  # its full blocks reach the index as usual
    out = step(s)
    assert out.chunks[0].token_ids == (42,)
    s.finish_requests(["a"], FinishReason.STOP)
    pool.free(index.clear())
    assert pool.num_free_blocks == 16


def test_prefilled_request_keeps_its_blocks_while_it_waits(pool):
    s = make(pool, seqs=1, budget=64)
    s.add_request(req("a", 6))
    step(s)  # "a" runs and holds the only sequence slot
    blocks = pool.allocate(2)
    s.add_prefilled_request(req("b", 9, start=300), blocks, 8)
    for _ in range(3):
        out = step(s)
        assert [c.request_id for c in out.chunks] == ["a"]
        assert s.get_request("b").block_ids == blocks
    s.finish_requests(["a"], FinishReason.STOP)
    out = step(s)
    assert [(c.request_id, c.token_ids, c.num_computed_tokens) for c in out.chunks] == [
        ("b", (308,), 8)
    ]


def test_preempted_prefilled_request_recomputes_its_prompt():
    pool = BlockLedger(num_blocks=5, block_size=4)
    s = make(pool, budget=64)
    s.add_request(req("a", 8))
    step(s)  # a: blocks 0,1
    s.add_prefilled_request(req("b", 8, start=300), pool.allocate(2), 7)  # blocks 2,3
    step(s)  # a decodes (position 8: block 4), b computes position 7
    out = s.schedule()  # b needs a block for position 8: the pool is empty, b is preempted
    assert out.preempted_request_ids == ("b",)
    s.update_from_output(out, {c.request_id: [1] for c in out.chunks if c.sample})
    state = s.get_request("b")
    assert (state.num_computed_tokens, state.block_ids, state.num_external_tokens) == (0, [], 0)
    s.finish_requests(["a"], FinishReason.STOP)
    out = step(s)
    assert [(c.request_id, c.num_computed_tokens, len(c.token_ids)) for c in out.chunks] == [
        ("b", 0, 9)
    ]


def test_prefilled_request_rejects_inconsistent_blocks(pool):
    s = make(pool)
    with pytest.raises(InvalidRequestError, match="give 1..9"):
        s.add_prefilled_request(req("a", 10), pool.allocate(3), 10)
    with pytest.raises(InvalidRequestError, match=r"2 block\(s\) cannot hold exactly 9 tokens"):
        s.add_prefilled_request(req("a", 10), [0, 1], 9)
    assert not s.has_unfinished_requests()
