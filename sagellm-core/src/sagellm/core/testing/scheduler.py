"""Conformance suite of :class:`sagellm.core.protocols.Scheduler`.

The suite drives a scheduler the way an engine does, with a fake sampler in place of a
model: every step it checks the output (token budget, sequence cap, tokens and positions
of each chunk, block tables), lowers it with ``build_plan`` and compares the plan with
the output, then feeds back one sampled token per sampling chunk, and finishes a
request once it has ``max_tokens`` new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagellm.core.errors import InvalidRequestError
from sagellm.core.protocols import Scheduler
from sagellm.core.telemetry import SchedulerStats
from sagellm.core.testing._common import suite_settings
from sagellm.core.types import (
    ExecutionPlan,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    SchedulerOutput,
)

__all__ = ["SchedulerConformance", "SchedulerRun", "WorkloadRequest", "drive_to_completion"]


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a scripted workload."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    arrival_step: int = 0  # added just before this schedule() call (0: before the first)

    def to_request(self) -> GenerationRequest:
        """The :class:`GenerationRequest` the engine would hand the scheduler."""
        return GenerationRequest(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling=SamplingParams(max_tokens=self.max_tokens, temperature=0.0),
        )


@dataclass
class SchedulerRun:
    """What :func:`drive_to_completion` observed."""

    outputs: list[SchedulerOutput] = field(default_factory=list)
    token_ids: dict[str, list[int]] = field(default_factory=dict)  # prompt + generated
    num_generated: dict[str, int] = field(default_factory=dict)
    num_preemptions: int = 0  # sum of len(output.preempted_request_ids)

    @property
    def num_steps(self) -> int:
        """schedule() calls made."""
        return len(self.outputs)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens scheduled over the run."""
        return sum(o.num_scheduled_tokens for o in self.outputs)


def fake_token(request_index: int, position: int) -> int:
    """The token the fake sampler produces for a request at a position (deterministic)."""
    return 1 + (position * 31 + request_index * 7) % 997


def check_plan(output: SchedulerOutput, plan: object, block_size: int) -> None:
    """Assert that ``plan`` is ``output`` lowered: the same chunks, in order."""
    assert isinstance(plan, ExecutionPlan), f"build_plan returned {type(plan).__name__}"
    assert plan.plan_id == output.step_id
    assert plan.request_ids == tuple(c.request_id for c in output.chunks)
    compute = plan.compute_chunks
    assert len(compute) == len(output.chunks), (
        f"plan has {len(compute)} compute chunks for {len(output.chunks)} scheduled chunks"
    )
    for sc, chunk in zip(compute, output.chunks):
        assert sc.request_id == chunk.request_id
        assert sc.token_ids == chunk.token_ids
        assert sc.start_position == chunk.num_computed_tokens
        assert sc.block_ids == chunk.block_ids
        assert sc.sample == chunk.sample
        end = sc.start_position + len(sc.token_ids)
        assert len(sc.block_ids) * block_size >= end, (
            f"block table of {sc.request_id} ({len(sc.block_ids)} blocks) does not cover "
            f"position {end - 1}"
        )


def drive_to_completion(
    scheduler: Any,
    pool: Any,
    workload: Sequence[WorkloadRequest],
    *,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_steps: int = 10_000,
) -> SchedulerRun:
    """Run ``workload`` through ``scheduler`` to the end, checking every step.

    ``pool`` is the KV pool the scheduler allocates from; it must not be shared with a
    prefix index (each block belongs to one request). Raises AssertionError on the first
    broken rule.
    """
    block_size = pool.schema.block_size
    index = {w.request_id: i for i, w in enumerate(workload)}
    by_id = {w.request_id: w for w in workload}
    pending = sorted(workload, key=lambda w: w.arrival_step)
    run = SchedulerRun()
    live: set[str] = set()
    computed: dict[str, int] = {}
    preempted: set[str] = set()
    step = 0
    last_step_id: int | None = None
    idle = 0
    while pending or scheduler.has_unfinished_requests():
        assert step < max_steps, f"no completion after {max_steps} steps"
        while pending and pending[0].arrival_step <= step:
            w = pending.pop(0)
            scheduler.add_request(w.to_request())
            run.token_ids[w.request_id] = list(w.prompt_token_ids)
            run.num_generated[w.request_id] = 0
            computed[w.request_id] = 0
            live.add(w.request_id)
        step += 1
        had_work = scheduler.has_unfinished_requests()
        out = scheduler.schedule()
        assert isinstance(out, SchedulerOutput)
        run.outputs.append(out)
        if last_step_id is not None:
            assert out.step_id == last_step_id + 1, "step_id must increase by one per call"
        last_step_id = out.step_id

        chunks = out.chunks
        ids = [c.request_id for c in chunks]
        assert len(set(ids)) == len(ids), f"a request appears twice in one step: {ids}"
        assert set(ids) <= live, f"scheduled unknown or finished requests {set(ids) - live}"
        assert len(chunks) <= max_num_seqs, f"{len(chunks)} sequences > max_num_seqs"
        assert out.num_scheduled_tokens == sum(len(c.token_ids) for c in chunks)
        assert out.num_scheduled_tokens <= max_num_batched_tokens, (
            f"{out.num_scheduled_tokens} tokens > max_num_batched_tokens"
        )
        assert out.num_waiting == scheduler.num_waiting
        assert out.num_running == scheduler.num_running
        assert not set(out.preempted_request_ids) & set(ids), "preempted and scheduled at once"
        run.num_preemptions += len(out.preempted_request_ids)
        preempted.update(out.preempted_request_ids)

        owners: dict[int, str] = {}
        for c in chunks:
            rid = c.request_id
            tokens = run.token_ids[rid]
            start = c.num_computed_tokens
            assert c.token_ids, f"empty chunk for {rid}"
            if rid in preempted:  # lost its blocks: recomputed from the start
                assert start == 0, f"{rid}: resumes at {start} after losing its blocks"
                preempted.discard(rid)
            else:
                assert start == computed[rid], (
                    f"{rid}: chunk starts at {start}, {computed[rid]} tokens are computed"
                )
            end = start + len(c.token_ids)
            assert tuple(tokens[start:end]) == c.token_ids, (
                f"{rid}: chunk tokens {c.token_ids} differ from tokens {start}..{end - 1}"
            )
            assert c.sample is (end == len(tokens)), f"{rid}: sample flag wrong at {end}"
            assert c.num_draft_tokens == 0
            assert len(c.block_ids) * block_size >= end, f"{rid}: block table too short"
            assert len(set(c.block_ids)) == len(c.block_ids), f"{rid}: repeated block"
            for b in c.block_ids:
                assert pool.ref_count(b) >= 1, f"{rid}: block {b} is free in the pool"
                assert b not in owners, f"block {b} given to {owners.get(b)} and {rid}"
                owners[b] = rid

        check_plan(out, scheduler.build_plan(out), block_size)

        idle = idle + 1 if had_work and not chunks else 0
        assert idle <= 3, "the scheduler made no progress for several steps"

        sampled: dict[str, list[int]] = {}
        for c in chunks:
            computed[c.request_id] = c.num_computed_tokens + len(c.token_ids)
            if c.sample:
                tok = fake_token(index[c.request_id], len(run.token_ids[c.request_id]))
                sampled[c.request_id] = [tok]
        scheduler.update_from_output(out, sampled)
        done = []
        for rid, toks in sampled.items():
            run.token_ids[rid].extend(toks)
            run.num_generated[rid] += len(toks)
            if run.num_generated[rid] >= by_id[rid].max_tokens:
                done.append(rid)
        if done:
            scheduler.finish_requests(done, FinishReason.LENGTH)
            live.difference_update(done)

    for w in workload:
        assert run.num_generated[w.request_id] == w.max_tokens, w.request_id
    assert not scheduler.has_unfinished_requests()
    assert (scheduler.num_waiting, scheduler.num_running) == (0, 0)
    assert pool.num_free_blocks == pool.num_blocks, (
        f"{pool.num_blocks - pool.num_free_blocks} blocks still in use after every request finished"
    )
    return run


def _expected_tokens(w: WorkloadRequest, request_index: int) -> list[int]:
    tokens = list(w.prompt_token_ids)
    for _ in range(w.max_tokens):
        tokens.append(fake_token(request_index, len(tokens)))
    return tokens


@st.composite
def _workloads(draw: st.DrawFn, block_size: int) -> tuple[int, int, int, list[WorkloadRequest]]:
    max_model_len = 8 * block_size
    num_blocks = draw(st.integers(8, 24))
    max_num_seqs = draw(st.integers(1, 4))
    budget = draw(st.integers(block_size, 8 * block_size))
    n = draw(st.integers(1, 5))
    workload = []
    for i in range(n):
        max_tokens = draw(st.integers(1, 2 * block_size))
        prompt_len = draw(st.integers(1, max_model_len - max_tokens))
        prompt = draw(st.lists(st.integers(0, 999), min_size=prompt_len, max_size=prompt_len))
        arrival = draw(st.integers(0, 5))
        workload.append(WorkloadRequest(f"r{i}", tuple(prompt), max_tokens, arrival))
    return num_blocks, max_num_seqs, budget, workload


class SchedulerConformance:
    """Behaviour every scheduler shares. Implement :meth:`make_pool` and :meth:`make_scheduler`.

    ``make_pool(num_blocks, block_size)`` returns a fresh CPU KV pool of that size (any
    small schema); ``make_scheduler(pool, max_model_len, max_num_seqs,
    max_num_batched_tokens)`` returns a scheduler over that pool **without** a prefix
    index, so that every block is owned by one request and returns to the pool when the
    request ends.
    """

    #: Tokens per block of the pools the suite builds.
    block_size: ClassVar[int] = 4
    #: Hypothesis examples of the random-workload test.
    max_examples: ClassVar[int] = 15

    def make_pool(self, num_blocks: int, block_size: int) -> Any:
        """A fresh KV pool (override this)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_pool(num_blocks, block_size)"
        )

    def make_scheduler(
        self, pool: Any, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> Any:
        """A fresh scheduler over ``pool`` (override this)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_scheduler(pool, max_model_len, "
            "max_num_seqs, max_num_batched_tokens)"
        )

    def _setup(
        self,
        num_blocks: int = 32,
        max_model_len: int = 64,
        max_num_seqs: int = 4,
        max_num_batched_tokens: int = 64,
    ) -> tuple[Any, Any]:
        pool = self.make_pool(num_blocks, self.block_size)
        return pool, self.make_scheduler(pool, max_model_len, max_num_seqs, max_num_batched_tokens)

    def _run(
        self,
        workload: Sequence[WorkloadRequest],
        *,
        num_blocks: int = 32,
        max_model_len: int = 64,
        max_num_seqs: int = 4,
        max_num_batched_tokens: int = 64,
    ) -> tuple[Any, SchedulerRun]:
        pool, sched = self._setup(num_blocks, max_model_len, max_num_seqs, max_num_batched_tokens)
        run = drive_to_completion(
            sched,
            pool,
            workload,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
        )
        for i, w in enumerate(workload):
            assert run.token_ids[w.request_id] == _expected_tokens(w, i)
        return sched, run

    @staticmethod
    def _prompt(n: int, start: int = 0) -> tuple[int, ...]:
        return tuple(range(start + 1, start + n + 1))

    # ------------------------------------------------------------------ basics

    def test_is_scheduler(self) -> None:
        _, sched = self._setup()
        assert isinstance(sched, Scheduler)
        assert sched.has_unfinished_requests() is False
        assert (sched.num_waiting, sched.num_running) == (0, 0)

    def test_add_request_queues_it(self) -> None:
        _, sched = self._setup()
        sched.add_request(WorkloadRequest("a", self._prompt(5), 2).to_request())
        assert sched.has_unfinished_requests() is True
        assert (sched.num_waiting, sched.num_running) == (1, 0)

    def test_one_request_completes(self) -> None:
        _, run = self._run([WorkloadRequest("a", self._prompt(10), 5)])
        assert run.num_generated == {"a": 5}

    def test_token_budget_and_sequence_cap_are_respected(self) -> None:
        workload = [
            WorkloadRequest(f"r{i}", self._prompt(3 + 5 * i, start=100 * i), 2 + i % 3)
            for i in range(6)
        ]
        self._run(workload, num_blocks=48, max_num_seqs=2, max_num_batched_tokens=8)

    def test_long_prompt_is_prefilled_in_chunks(self) -> None:
        _, run = self._run([WorkloadRequest("long", self._prompt(30), 3)], max_num_batched_tokens=8)
        assert max(o.num_scheduled_tokens for o in run.outputs) <= 8
        assert sum(o.num_scheduled_tokens for o in run.outputs) >= 30 + 2

    def test_requests_arriving_later_complete(self) -> None:
        workload = [
            WorkloadRequest("early", self._prompt(9), 6, arrival_step=0),
            WorkloadRequest("late", self._prompt(5, start=50), 4, arrival_step=3),
        ]
        self._run(workload)

    def test_preemption_in_a_tiny_pool_still_completes_everything(self) -> None:
        bs = self.block_size
        workload = [
            WorkloadRequest(f"r{i}", self._prompt(2 * bs, start=10 * i), 2 * bs) for i in range(4)
        ]
        # each request ends up needing 4 blocks: the pool holds one and a half of them
        self._run(workload, num_blocks=6, max_model_len=6 * bs, max_num_batched_tokens=6 * bs)

    # ------------------------------------------------------------------ errors and aborts

    def test_too_long_prompt_raises(self) -> None:
        _, sched = self._setup(max_model_len=32)
        with pytest.raises(InvalidRequestError):
            sched.add_request(WorkloadRequest("long", self._prompt(33), 1).to_request())
        assert sched.has_unfinished_requests() is False

    def test_prompt_larger_than_the_pool_raises(self) -> None:
        bs = self.block_size
        _, sched = self._setup(num_blocks=4, max_model_len=16 * bs)
        with pytest.raises(InvalidRequestError):
            sched.add_request(WorkloadRequest("big", self._prompt(4 * bs + 1), 1).to_request())
        assert sched.has_unfinished_requests() is False

    def test_abort_frees_blocks(self) -> None:
        pool, sched = self._setup(num_blocks=16)
        for rid, start in (("a", 0), ("b", 100)):
            sched.add_request(WorkloadRequest(rid, self._prompt(9, start), 8).to_request())
        out = sched.schedule()
        held = {c.request_id: set(c.block_ids) for c in out.chunks}
        assert "a" in held, "the first request was not scheduled in the first step"
        sched.update_from_output(out, {c.request_id: [7] for c in out.chunks if c.sample})
        sched.finish_requests(["a"], FinishReason.ABORT)
        assert all(pool.ref_count(b) == 0 for b in held["a"])
        assert pool.num_free_blocks == pool.num_blocks - len(held.get("b", ()))
        assert sched.has_unfinished_requests() is True
        sched.finish_requests(["b", "unknown-id"], FinishReason.ABORT)
        assert sched.has_unfinished_requests() is False
        assert pool.num_free_blocks == pool.num_blocks
        assert sched.schedule().chunks == ()

    def test_abort_of_a_waiting_request(self) -> None:
        pool, sched = self._setup()
        sched.add_request(WorkloadRequest("a", self._prompt(5), 2).to_request())
        sched.finish_requests(["a"], FinishReason.ABORT)
        assert sched.has_unfinished_requests() is False
        assert sched.num_waiting == 0
        out = sched.schedule()
        assert (out.chunks, out.num_scheduled_tokens) == ((), 0)
        assert pool.num_free_blocks == pool.num_blocks

    def test_unknown_ids_are_ignored_by_finish(self) -> None:
        _, sched = self._setup()
        sched.finish_requests(["nobody"], FinishReason.STOP)
        assert sched.has_unfinished_requests() is False

    # ------------------------------------------------------------------ plan and stats

    def test_build_plan_lowers_the_output(self) -> None:
        _, sched = self._setup()
        sched.add_request(WorkloadRequest("a", self._prompt(6), 2).to_request())
        sched.add_request(WorkloadRequest("b", self._prompt(3, 50), 2).to_request())
        out = sched.schedule()
        assert {c.request_id for c in out.chunks} == {"a", "b"}
        check_plan(out, sched.build_plan(out), self.block_size)

    def test_make_stats_reports_and_resets_counters(self) -> None:
        workload = [WorkloadRequest(f"r{i}", self._prompt(6, 10 * i), 3) for i in range(3)]
        sched, run = self._run(workload)
        stats = sched.make_stats()
        assert isinstance(stats, SchedulerStats)
        assert stats.num_steps == run.num_steps
        assert stats.num_scheduled_tokens == run.num_scheduled_tokens
        assert stats.num_preemptions == run.num_preemptions
        assert (stats.num_waiting, stats.num_running) == (0, 0)
        again = sched.make_stats()
        assert (again.num_steps, again.num_scheduled_tokens, again.num_preemptions) == (0, 0, 0)

    # ------------------------------------------------------------------ properties

    def test_random_workloads_complete(self) -> None:
        """Random prompts, lengths, arrivals, pool sizes, budgets and caps all complete."""
        bs = self.block_size

        @suite_settings(self.max_examples)
        @given(case=_workloads(bs))
        def check(case: tuple[int, int, int, list[WorkloadRequest]]) -> None:
            num_blocks, max_num_seqs, budget, workload = case
            self._run(
                workload,
                num_blocks=num_blocks,
                max_model_len=8 * bs,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=budget,
            )

        check()
