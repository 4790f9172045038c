from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sagellm.core import registry
from sagellm.core.protocols import Scheduler
from sagellm.core.types import SLO, FinishReason, GenerationRequest, IRNodeKind
from sagellm.scheduler_ir import (
    AdaptiveScheduler,
    AdaptiveSchedulerConfig,
    FairScheduler,
    FairSchedulerConfig,
    FCFSScheduler,
    FCFSSchedulerConfig,
    PDScheduler,
    PDSchedulerConfig,
    PriorityScheduler,
    PrioritySchedulerConfig,
    SLOScheduler,
    SLOSchedulerConfig,
    split_plan,
)
from sagellm.scheduler_ir.sim import BlockLedger

from .conftest import DictPrefixIndex

POLICIES = {
    "fcfs": (FCFSScheduler, FCFSSchedulerConfig),
    "priority": (PriorityScheduler, PrioritySchedulerConfig),
    "fair": (FairScheduler, FairSchedulerConfig),
    "slo": (SLOScheduler, SLOSchedulerConfig),
    "adaptive": (AdaptiveScheduler, AdaptiveSchedulerConfig),
    "pd": (PDScheduler, PDSchedulerConfig),
}


def req(rid: str, n: int, start: int = 100, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(range(start, start + n)), **kw)


def make(cls, cfg_cls, pool=None, *, seqs=8, budget=16, model_len=64, ctx=None, **kw):
    pool = pool or BlockLedger(num_blocks=16, block_size=4)
    cfg = cfg_cls(max_num_seqs=seqs, max_num_batched_tokens=budget, **kw)
    return cls(cfg, kv_pool=pool, max_model_len=model_len, **(ctx or {}))


def step(sched, token: int = 7):
    out = sched.schedule()
    sched.update_from_output(out, {c.request_id: [token] for c in out.chunks if c.sample})
    return out


def ids(out):
    return [(c.request_id, len(c.token_ids)) for c in out.chunks]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_registered_and_is_a_scheduler(name):
    pool = BlockLedger(num_blocks=8, block_size=4)
    s = registry.load(
        "scheduler", name, {"max_num_batched_tokens": 32}, kv_pool=pool, max_model_len=64
    )
    assert type(s) is POLICIES[name][0]
    assert isinstance(s, Scheduler)


# ---------------------------------------------------------------- priority


def test_priority_orders_waiting_by_priority_then_arrival():
    s = make(PriorityScheduler, PrioritySchedulerConfig, seqs=2, budget=64)
    s.add_request(req("a", 3, priority=2, arrival_time=1.0))
    s.add_request(req("b", 3, priority=0, arrival_time=3.0))
    s.add_request(req("c", 3, priority=0, arrival_time=2.0))
    s.add_request(req("d", 3, priority=1, arrival_time=0.0))
    assert [c.request_id for c in step(s).chunks] == ["c", "b"]
    s.finish_requests(["b", "c"], FinishReason.STOP)
    assert [c.request_id for c in step(s).chunks] == ["d", "a"]


def test_priority_preempts_the_worst_running_request_at_the_sequence_cap():
    s = make(PriorityScheduler, PrioritySchedulerConfig, seqs=2, budget=64)
    s.add_request(req("lo", 3, priority=5))
    s.add_request(req("mid", 3, priority=3))
    step(s)
    s.add_request(req("hi", 3, priority=0))
    out = s.schedule()
    assert out.preempted_request_ids == ("lo",)
    # lo's decode chunk of this step was dropped; hi is prefilled; mid decodes
    assert ids(out) == [("hi", 3), ("mid", 1)]
    assert (out.num_running, out.num_waiting) == (2, 1)
    assert s.get_request("lo").token_ids[-1] == 7  # output kept for the recompute


def test_priority_spares_victims_that_computed_more_than_the_cap():
    s = make(
        PriorityScheduler, PrioritySchedulerConfig, seqs=1, budget=64, max_victim_computed_tokens=4
    )
    s.add_request(req("lo", 5, priority=5))
    step(s)  # lo computed 5 tokens > 4
    s.add_request(req("hi", 3, priority=0))
    out = s.schedule()
    assert out.preempted_request_ids == () and ids(out) == [("lo", 1)]


def test_priority_equal_priorities_never_preempt():
    s = make(PriorityScheduler, PrioritySchedulerConfig, seqs=1, budget=64)
    s.add_request(req("a", 3, priority=1))
    step(s)
    s.add_request(req("b", 3, priority=1))
    out = s.schedule()
    assert out.preempted_request_ids == () and ids(out) == [("a", 1)]


def test_priority_preempts_when_the_pool_is_full():
    pool = BlockLedger(num_blocks=2, block_size=4)
    s = make(PriorityScheduler, PrioritySchedulerConfig, pool, budget=64)
    s.add_request(req("lo", 6, priority=9))
    step(s)  # lo holds both blocks
    s.add_request(req("hi", 3, priority=0))
    out = s.schedule()
    assert out.preempted_request_ids == ("lo",)
    assert [(c.request_id, c.block_ids) for c in out.chunks] == [("hi", (0,))]


def test_priority_running_pass_preempts_lowest_priority_not_latest():
    pool = BlockLedger(num_blocks=4, block_size=4)
    s = make(
        PriorityScheduler, PrioritySchedulerConfig, pool, budget=64, preempt_for_priority=False
    )
    s.add_request(req("lo", 7, priority=9))
    step(s)
    s.add_request(req("hi", 7, priority=0, start=300))
    step(s)  # hi admitted after lo (FCFS would preempt hi), but ranks before it
    out = s.schedule()  # lo needs a third block and none is free: lo itself goes
    assert out.preempted_request_ids == ("lo",)
    assert ids(out) == [("hi", 1)]


# ---------------------------------------------------------------- fair


def test_fair_round_robin_by_weighted_deficit():
    s = make(FairScheduler, FairSchedulerConfig, seqs=1, budget=64, quantum=4, weights={"x": 2.0})
    for i in range(3):
        s.add_request(req(f"x{i}", 4, tenant="x"))
    for i in range(3):
        s.add_request(req(f"y{i}", 4, tenant="y"))
    order = []
    while s.has_unfinished_requests():
        out = step(s)
        for c in out.chunks:
            if c.is_prefill:
                order.append(c.request_id)
        s.finish_requests([c.request_id for c in out.chunks], FinishReason.STOP)
    # x gets 8 tokens of deficit per visit (two requests), y gets 4 (one request)
    assert order == ["x0", "x1", "y0", "x2", "y1", "y2"]


def test_fair_plain_fcfs_would_serve_one_tenant_first():
    s = make(FCFSScheduler, FCFSSchedulerConfig, seqs=1, budget=64)
    for r in ("x0", "x1", "y0"):
        s.add_request(req(r, 4, tenant=r[0]))
    assert [c.request_id for c in step(s).chunks] == ["x0"]


def test_fair_weights_must_be_positive():
    with pytest.raises(ValidationError, match="greater than 0"):
        FairSchedulerConfig(weights={"x": 0.0})


def test_fair_abort_of_a_waiting_request_charges_nothing():
    s = make(FairScheduler, FairSchedulerConfig, seqs=1, budget=64, quantum=4)
    s.add_request(req("x0", 4, tenant="x"))
    s.add_request(req("y0", 4, tenant="y"))
    s.finish_requests(["y0"], FinishReason.ABORT)
    assert [c.request_id for c in step(s).chunks] == ["x0"]
    assert not s.has_unfinished_requests() or s.num_waiting == 0


# ---------------------------------------------------------------- admission control


def test_admission_reject_reports_ids_and_counts():
    s = make(FCFSScheduler, FCFSSchedulerConfig, max_waiting=2, admission="reject")
    for r in "abcd":
        s.add_request(req(r, 3))
    out = s.schedule()
    assert out.rejected_request_ids == ("c", "d")
    assert [c.request_id for c in out.chunks] == ["a", "b"]
    assert s.schedule().rejected_request_ids == ()
    assert s.make_stats().num_rejected == 2
    s.finish_requests(["c"], FinishReason.REJECTED)  # the engine finishing it: not recounted
    assert s.make_stats().num_rejected == 0


def test_admission_queue_holds_requests_until_there_is_room():
    s = make(PriorityScheduler, PrioritySchedulerConfig, seqs=1, budget=64, max_waiting=1)
    s.add_request(req("a", 3, priority=5))
    s.add_request(req("b", 3, priority=0))  # held: the waiting queue is full
    assert s.num_waiting == 2
    out = step(s)
    assert ids(out) == [("a", 3)] and out.rejected_request_ids == ()
    s.finish_requests(["a"], FinishReason.STOP)
    assert ids(step(s)) == [("b", 3)]


def test_admission_max_queue_tokens():
    s = make(FCFSScheduler, FCFSSchedulerConfig, max_queue_tokens=10, admission="reject")
    s.add_request(req("a", 6))
    s.add_request(req("b", 5))  # 11 > 10
    s.add_request(req("c", 4))  # 10 fits
    assert s.schedule().rejected_request_ids == ("b",)


def test_admission_a_single_large_request_is_never_rejected_by_tokens():
    s = make(FCFSScheduler, FCFSSchedulerConfig, max_queue_tokens=4, admission="reject")
    s.add_request(req("a", 9))
    out = s.schedule()
    assert out.rejected_request_ids == () and ids(out) == [("a", 9)]


# ---------------------------------------------------------------- slo


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slo_orders_by_least_slack():
    clock = Clock()
    s = make(
        SLOScheduler,
        SLOSchedulerConfig,
        seqs=1,
        budget=64,
        ctx={"clock": clock},
        step_overhead_ms=10.0,
        per_token_ms=1.0,
    )
    s.add_request(req("loose", 4, slo=SLO(ttft_ms=500)))
    s.add_request(req("none", 4))
    s.add_request(req("tight", 20, slo=SLO(ttft_ms=100)))  # slack 100 - 30 = 70
    s.add_request(req("tighter", 4, slo=SLO(ttft_ms=60)))  # slack 60 - 14 = 46
    assert s.slack_ms(s.get_request("tight")) == 70.0
    order = []
    while s.has_unfinished_requests():
        out = step(s)
        order += [c.request_id for c in out.chunks]
        s.finish_requests([c.request_id for c in out.chunks], FinishReason.STOP)
    assert order == ["tighter", "tight", "loose", "none"]


def test_slo_demotes_requests_that_missed_their_ttft():
    clock = Clock()
    s = make(
        SLOScheduler,
        SLOSchedulerConfig,
        seqs=1,
        budget=64,
        ctx={"clock": clock},
        step_overhead_ms=10.0,
        per_token_ms=1.0,
    )
    s.add_request(req("late", 4, slo=SLO(ttft_ms=20), arrival_time=0.0))
    s.add_request(req("free", 4, arrival_time=0.5))
    clock.now = 1.0  # "late" is 986 ms past its deadline
    assert [c.request_id for c in step(s).chunks] == ["free"]


def test_slo_decodes_first_and_prefill_capped_by_tpot():
    clock = Clock()
    s = make(
        SLOScheduler,
        SLOSchedulerConfig,
        budget=64,
        ctx={"clock": clock},
        step_overhead_ms=10.0,
        per_token_ms=1.0,
    )
    s.add_request(req("d", 3, slo=SLO(tpot_ms=20)))
    step(s)  # d decodes from now on
    s.add_request(req("p", 30, start=300))
    out = s.schedule()
    # 20 ms - 10 ms overhead = 10 tokens; 1 for d's decode leaves 9 of prefill
    assert ids(out) == [("p", 9), ("d", 1)]


def test_slo_observe_step_learns_the_step_cost_model():
    s = make(SLOScheduler, SLOSchedulerConfig, step_overhead_ms=10.0, per_token_ms=1.0, ewma=0.5)
    assert s.estimate_ms(20) == 2 * 10.0 + 20.0  # the prior: two 16-token steps
    for _ in range(40):  # decode-sized and prefill-sized steps on 30 ms + 2 ms/token
        s.observe_step(2, 0.034)
        s.observe_step(16, 0.062)
    s.observe_step(0, 1.0)  # ignored
    assert s.cost.a_ms == pytest.approx(30.0) and s.per_token_ms == pytest.approx(2.0)
    assert s.estimate_ms(20) == pytest.approx(2 * 30.0 + 40.0)


def test_slo_running_prefill_yields_to_a_waiting_request_with_less_slack():
    clock = Clock()
    kw = {"seqs": 4, "budget": 16, "step_overhead_ms": 10.0, "per_token_ms": 1.0}
    pool = BlockLedger(num_blocks=32, block_size=4)
    s = make(SLOScheduler, SLOSchedulerConfig, pool, ctx={"clock": clock}, **kw)
    s.add_request(req("long", 40, slo=SLO(ttft_ms=1000)))
    assert ids(step(s)) == [("long", 16)]
    s.add_request(req("short", 4, start=300, slo=SLO(ttft_ms=100)))
    # short's deadline (100 ms) is earlier than long's (1000 ms): long leaves the short
    # prompt's 4 tokens of the budget and keeps its blocks
    assert ids(step(s)) == [("long", 12), ("short", 4)]
    assert ids(step(s)) == [("long", 12), ("short", 1)]


def test_slo_defers_a_long_prompt_that_would_make_short_ones_miss():
    clock = Clock()
    kw = {"seqs": 1, "budget": 64, "step_overhead_ms": 10.0, "per_token_ms": 1.0}
    pool = BlockLedger(num_blocks=32, block_size=4)
    s = make(SLOScheduler, SLOSchedulerConfig, pool, ctx={"clock": clock}, model_len=128, **kw)
    s.add_request(req("long", 60, slo=SLO(ttft_ms=100)))  # 70 ms of prefill
    s.add_request(req("s1", 4, start=300, slo=SLO(ttft_ms=110)))  # 14 ms each
    s.add_request(req("s2", 4, start=400, slo=SLO(ttft_ms=120)))
    # by deadline: long (done at 70 ms), s1 (74), s2 (two steps, 88): all on time
    s._begin_step()
    assert [w.request_id for w in s._waiting] == ["long", "s1", "s2"]
    s.finish_requests(["long", "s1", "s2"], FinishReason.ABORT)
    s.add_request(req("long", 60, slo=SLO(ttft_ms=100)))
    s.add_request(req("s1", 4, start=300, slo=SLO(ttft_ms=80)))
    s.add_request(req("s2", 4, start=400, slo=SLO(ttft_ms=90)))
    # by deadline: s1 (done at 14 ms), s2 (18), long (88 <= 100): all on time
    s._begin_step()
    assert [w.request_id for w in s._waiting] == ["s1", "s2", "long"]
    s.finish_requests(["long", "s1", "s2"], FinishReason.ABORT)
    s.add_request(req("long", 60, slo=SLO(ttft_ms=70)))
    s.add_request(req("s1", 4, start=300, slo=SLO(ttft_ms=75)))
    s.add_request(req("s2", 4, start=400, slo=SLO(ttft_ms=80)))
    # by deadline: long (70 ms), s1 (74 <= 75), s2 (two steps, 88 > 80): the longest so
    # far, long, is deferred; s1 and s2 (18 ms) meet theirs: two requests on time, not one
    s._begin_step()
    assert [w.request_id for w in s._waiting] == ["s1", "s2", "long"]
    assert ids(s.schedule()) == [("s1", 4)]


def test_slo_decodes_that_missed_their_ttft_do_not_cap_prefill():
    clock = Clock()
    kw = {"budget": 64, "step_overhead_ms": 10.0, "per_token_ms": 1.0}
    s = make(SLOScheduler, SLOSchedulerConfig, ctx={"clock": clock}, **kw)
    s.add_request(req("late", 3, slo=SLO(ttft_ms=50, tpot_ms=20)))
    clock.now = 0.1  # its first token comes 100 ms after arrival: TTFT missed
    step(s)
    s.add_request(req("p", 30, start=300, arrival_time=0.1))
    assert ids(s.schedule()) == [("p", 30), ("late", 1)]  # no cap for a lost request


# ---------------------------------------------------------------- adaptive


def fitted(
    clock, cls=AdaptiveScheduler, cfg_cls=AdaptiveSchedulerConfig, *, a_ms=30.0, b_ms=2.0, **kw
):
    """A cost-aware scheduler whose model has learned a_ms + b_ms * tokens."""
    pool = BlockLedger(num_blocks=64, block_size=4)
    s = make(
        cls,
        cfg_cls,
        pool,
        seqs=8,
        budget=64,
        model_len=256,
        ctx={"clock": clock},
        ewma=0.5,
        **kw,
    )
    for _ in range(40):
        s.observe_step(4, (a_ms + 4 * b_ms) / 1000)
        s.observe_step(64, (a_ms + 64 * b_ms) / 1000)
    assert s.cost.a_ms == pytest.approx(a_ms) and s.cost.b_ms == pytest.approx(b_ms)
    return s


def test_adaptive_prefill_budget_keeps_the_predicted_step_within_tpot():
    clock = Clock()
    s = fitted(clock, target_tpot_ms=100.0)
    s.add_request(req("a", 3))
    assert ids(step(s)) == [("a", 3)]  # no decodes: the whole budget
    s.add_request(req("b", 100, start=300))
    # (100 ms - 30 ms) / 2 ms = 35 tokens per step, one of them a's decode
    out = step(s)
    assert ids(out) == [("b", 34), ("a", 1)]
    assert s.cost.step_ms(out.num_scheduled_tokens) == pytest.approx(100.0)
    clock.now = 0.04  # a has 2 tokens, the first 40 ms old: the next step may take 160 ms
    s._now = clock.now
    assert s.tpot_allowance_ms(s.get_request("a")) == pytest.approx(160.0)
    assert ids(s.schedule()) == [("b", 63), ("a", 1)]  # (160 - 30) / 2 - 1 = 64: no cap


def test_adaptive_does_not_starve_prefill_when_the_objective_is_infeasible():
    clock = Clock()
    # every step, decode-only included, takes over 120 ms: the 100 ms objective is out of
    # reach, so throttling prefill would only make the queue wait (the old rule's collapse)
    s = fitted(clock, a_ms=120.0, b_ms=2.0, target_tpot_ms=100.0)
    s.add_request(req("a", 3))
    step(s)
    s.add_request(req("b", 100, start=300))
    assert ids(step(s)) == [("b", 63), ("a", 1)]
    assert ids(step(s)) == [("b", 37), ("a", 1)]


def test_adaptive_prefill_floor_and_ttft_trade():
    clock = Clock()
    s = fitted(clock, target_tpot_ms=34.0, min_prefill_tokens=8)
    s.add_request(req("a", 3))
    step(s)
    s.add_request(req("b", 100, start=300))
    assert ids(s.schedule()) == [("b", 8), ("a", 1)]  # (34 - 30) / 2 - 1 = 1 -> floor of 8

    # In arrival order: b is the head and would miss its 120 ms TTFT at the TPOT budget of
    # 34 tokens (two steps, 144 ms); it gets the smallest chunk that meets it, 40 (112 ms).
    s = fitted(clock, target_tpot_ms=100.0)
    s.add_request(req("a", 3))
    step(s)
    s.add_request(req("b", 40, start=300, slo=SLO(ttft_ms=120)))
    s._begin_step()
    assert s.prefill_budget() == 40
    assert ids(s.schedule()) == [("b", 40), ("a", 1)]
    # When even the full budget cannot save the head, it still gets the full budget: the
    # queue behind it drains instead of piling up.
    s = fitted(clock, target_tpot_ms=100.0)
    s.add_request(req("a", 3))
    step(s)
    s.add_request(req("b", 100, start=300, slo=SLO(ttft_ms=50)))
    assert ids(s.schedule()) == [("b", 63), ("a", 1)]


def test_slo_prefill_budget_trades_decodes_tpot_for_more_ttfts_met():
    clock = Clock()
    s = fitted(clock, SLOScheduler, SLOSchedulerConfig, default_tpot_ms=60.0)
    s.add_request(req("a", 3))
    step(s)
    s.add_request(req("b", 20, start=300, slo=SLO(ttft_ms=80)))
    s.add_request(req("c", 4, start=400, slo=SLO(ttft_ms=100)))
    # At the TPOT budget of (60 - 30) / 2 - 1 = 14 tokens both miss their TTFT: b needs
    # 20-token chunks (72 ms), c (24 tokens with b's) 24-token chunks (80 ms). Chunks of 24
    # save both and put a alone over its 60 ms, a gain of one request; 20 would gain nothing.
    s._begin_step()
    assert s.prefill_budget() == 24
    assert ids(s.schedule()) == [("b", 20), ("c", 4), ("a", 1)]
    s.finish_requests(["b", "c"], FinishReason.ABORT)
    s.add_request(req("b", 20, start=300, slo=SLO(ttft_ms=80)))
    s._begin_step()
    assert s.prefill_budget() == 14  # saving b alone would cost a: no gain


# ---------------------------------------------------------------- pd


def test_pd_separate_budgets_and_seq_caps():
    s = make(
        PDScheduler,
        PDSchedulerConfig,
        budget=64,
        prefill_token_budget=8,
        decode_token_budget=2,
        max_num_prefill_seqs=1,
        max_num_decode_seqs=2,
    )
    for r, st_ in (("a", 100), ("b", 200), ("c", 300)):
        s.add_request(req(r, 3, start=st_))
    assert ids(step(s)) == [("a", 3)]  # one prefilling request at a time
    assert ids(step(s)) == [("b", 3), ("a", 1)]
    assert ids(step(s)) == [("c", 3), ("a", 1), ("b", 1)]
    out = step(s)  # decode budget 2: c waits for a decode slot
    assert ids(out) == [("a", 1), ("b", 1)]


def test_pd_plan_marks_phases_and_splits():
    s = make(
        PDScheduler, PDSchedulerConfig, budget=64, prefill_device="cpu:0", decode_device="cpu:1"
    )
    s.add_request(req("a", 3))
    step(s)
    s.add_request(req("b", 5, start=300))
    out = s.schedule()
    plan = s.build_plan(out)
    marks = [(n.kind, n.device, n.config.get("phase")) for n in plan.graph.nodes]
    assert marks == [
        (IRNodeKind.PREFILL_CHUNK, "cpu:0", "prefill"),
        (IRNodeKind.DECODE_BATCH, "cpu:1", "decode"),
        (IRNodeKind.SAMPLE, "", None),
    ]
    pre, dec = split_plan(plan, prefill_instance_id="p0", decode_instance_id="d0")
    assert (pre.target_instance_id, dec.target_instance_id) == ("p0", "d0")
    assert [n.kind for n in pre.graph.nodes] == [IRNodeKind.PREFILL_CHUNK, IRNodeKind.SAMPLE]
    assert [n.kind for n in dec.graph.nodes] == [IRNodeKind.DECODE_BATCH, IRNodeKind.SAMPLE]
    assert pre.graph.nodes[1].config["request_ids"] == ("b",)
    assert dec.graph.nodes[1].config["request_ids"] == ("a",)
    assert dec.graph.nodes[1].inputs == (1,) and pre.graph.nodes[1].inputs == (0,)
    assert pre.request_ids == ("b",) and dec.request_ids == ("a",)
    assert [c.request_id for c in pre.compute_chunks + dec.compute_chunks] == ["b", "a"]


def test_pd_split_of_a_decode_only_plan_has_an_empty_prefill_half():
    s = make(PDScheduler, PDSchedulerConfig, budget=64)
    s.add_request(req("a", 3))
    step(s)
    pre, dec = split_plan(s.build_plan(s.schedule()))
    assert pre.graph.nodes == () and [n.kind for n in dec.graph.nodes] == [
        IRNodeKind.DECODE_BATCH,
        IRNodeKind.SAMPLE,
    ]


# ---------------------------------------------------------------- random workloads


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(POLICIES)),
    spec=st.lists(
        st.tuples(st.integers(1, 20), st.integers(0, 3), st.sampled_from("xyz")),
        min_size=1,
        max_size=8,
    ),
    budget=st.integers(4, 24),
    num_blocks=st.integers(6, 24),
    out_len=st.integers(1, 5),
    admission=st.sampled_from(["queue", "reject"]),
)
def test_random_workloads_finish_without_leaks(name, spec, budget, num_blocks, out_len, admission):
    cls, cfg_cls = POLICIES[name]
    pool = BlockLedger(num_blocks=num_blocks, block_size=4)
    index = DictPrefixIndex(block_size=4)
    kw = {"max_waiting": 4, "admission": admission}
    if name == "pd":
        kw.update(prefill_token_budget=max(1, budget // 2), decode_token_budget=4)
    if name == "slo":
        kw.update(default_ttft_ms=50.0, default_tpot_ms=30.0)
    cfg = cfg_cls(max_num_seqs=3, max_num_batched_tokens=budget, **kw)
    s = cls(cfg, kv_pool=pool, max_model_len=64, prefix_index=index)
    rids = []
    for i, (n, prio, tenant) in enumerate(spec):
        rid = f"r{i}"
        rids.append(rid)
        s.add_request(
            req(
                rid, n, start=100 + (i % 2), priority=prio, tenant=tenant, slo=SLO(ttft_ms=10.0 + i)
            )
        )
    generated = dict.fromkeys(rids, 0)
    rejected: set[str] = set()
    finished: set[str] = set()
    for _ in range(3000):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        assert out.num_scheduled_tokens <= budget
        assert all(c.token_ids for c in out.chunks)
        rejected.update(out.rejected_request_ids)
        s.update_from_output(out, {c.request_id: [3] for c in out.chunks if c.sample})
        done = []
        for c in out.chunks:
            if c.sample:
                generated[c.request_id] += 1
                if generated[c.request_id] == out_len:
                    done.append(c.request_id)
        s.finish_requests(done, FinishReason.LENGTH)
        finished.update(done)
        if hasattr(s, "observe_step"):
            s.observe_step(out.num_scheduled_tokens, 0.015 + 0.0015 * out.num_scheduled_tokens)
    assert not s.has_unfinished_requests()
    assert finished | rejected == set(rids) and not (finished & rejected)
    if admission == "queue":
        assert not rejected
    pool.free(index.clear())
    assert pool.num_free_blocks == num_blocks
