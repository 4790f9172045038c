"""Conformance suite of :class:`sagellm.core.protocols.OverlapScheduler`.

Checks what every implementation promises, on plain data and fake collectives (no
torch): ``split`` covers exactly the plan's tokens in order, keeps decode chunks whole,
samples only from a chunk's last piece, keeps prefill and decode in their own node
kinds, puts migrations first and transfers last, and stays within a balance bound;
``schedule`` lists one compute, collective start and wait per layer and micro-batch in
a legal order; ``run`` follows its schedule, calls each waiter once before its result
is used, and finishes started collectives when a compute fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagellm.core.protocols import OverlapScheduler
from sagellm.core.testing._common import suite_settings
from sagellm.core.types import (
    ExecutionPlan,
    IRGraph,
    IRNode,
    IRNodeKind,
    MigrationPlan,
    OverlapOp,
    OverlapOpKind,
    SequenceChunk,
    TransferPlan,
)

__all__ = ["OverlapSchedulerConformance", "check_split", "make_plan"]

_COMPUTE = (IRNodeKind.PREFILL_CHUNK, IRNodeKind.DECODE_BATCH)


def make_plan(
    prefill: list[tuple[int, bool, int]],
    decode: list[int],
    *,
    decode_first: bool = False,
    migrate: bool = False,
    transfer: bool = False,
    plan_id: int = 7,
) -> ExecutionPlan:
    """A plan with one prefill node (``(num_tokens, sample, num_logits)`` per chunk),
    one decode node (``1 + drafts`` tokens per chunk, all sampled), a SAMPLE node over
    both and, optionally, a KV_MIGRATE node first and a KV_TRANSFER node last."""
    pre = tuple(
        SequenceChunk(f"p{i}", tuple(range(100 * i, 100 * i + n)), 3 * i, (i,), s, k)
        for i, (n, s, k) in enumerate(prefill)
    )
    dec = tuple(
        SequenceChunk(
            f"d{i}", tuple(range(5000 + 10 * i, 5000 + 10 * i + n)), 40 + i, (50 + i,), True, n
        )
        for i, n in enumerate(decode)
    )
    nodes: list[IRNode] = []
    if migrate:
        nodes.append(
            IRNode(10, IRNodeKind.KV_MIGRATE, migrations=(MigrationPlan("cpu", "gpu", (1,)),))
        )
    compute = [
        IRNode(1, IRNodeKind.PREFILL_CHUNK, chunks=pre),
        IRNode(2, IRNodeKind.DECODE_BATCH, chunks=dec),
    ]
    if decode_first:
        compute.reverse()
    compute = [n for n in compute if n.chunks]
    dep = (10,) if migrate else ()
    nodes.extend(IRNode(n.node_id, n.kind, inputs=dep, chunks=n.chunks) for n in compute)
    ids = tuple(n.node_id for n in compute)
    nodes.append(IRNode(3, IRNodeKind.SAMPLE, inputs=ids))
    if transfer:
        nodes.append(
            IRNode(
                4, IRNodeKind.KV_TRANSFER, inputs=ids, transfers=(TransferPlan("a", "b", (1,), 64),)
            )
        )
    order = [c.request_id for n in compute for c in n.chunks]
    return ExecutionPlan(plan_id=plan_id, graph=IRGraph(tuple(nodes)), request_ids=tuple(order))


def _tokens(plan: ExecutionPlan) -> list[tuple[str, int, int, str]]:
    """(request, position, token, node kind) of every compute token, in graph order."""
    out: list[tuple[str, int, int, str]] = []
    for n in plan.graph.nodes:
        if n.kind in _COMPUTE:
            for c in n.chunks:
                out.extend(
                    (c.request_id, c.start_position + j, t, n.kind.value)
                    for j, t in enumerate(c.token_ids)
                )
    return out


def check_split(plan: ExecutionPlan, parts: list[ExecutionPlan], num_micro_batches: int) -> None:
    """Assert what :meth:`OverlapScheduler.split` promises about ``parts``."""
    assert len(parts) == num_micro_batches
    # exact coverage, in order, each token in a node of its own kind
    assert [t for p in parts for t in _tokens(p)] == _tokens(plan)
    original = {c.request_id: c for c in plan.compute_chunks}
    decode_ids = {
        c.request_id for n in plan.graph.of_kind(IRNodeKind.DECODE_BATCH) for c in n.chunks
    }
    seen: dict[str, list[SequenceChunk]] = {}
    for i, p in enumerate(parts):
        assert p.plan_id == plan.plan_id and p.target_instance_id == plan.target_instance_id
        assert sum(n.num_tokens for n in p.graph.nodes if n.kind in _COMPUTE) > 0, (
            f"micro-batch {i} is empty"
        )
        ids = {n.node_id for n in p.graph.nodes}
        for n in p.graph.nodes:
            assert set(n.inputs) <= ids, (
                f"node {n.node_id} of micro-batch {i} depends on a node it lacks"
            )
        for c in p.compute_chunks:
            seen.setdefault(c.request_id, []).append(c)
        chunk_ids = [c.request_id for c in p.compute_chunks]
        assert list(p.request_ids[: len(dict.fromkeys(chunk_ids))]) == list(
            dict.fromkeys(chunk_ids)
        )
        kinds = [n.kind for n in p.graph.nodes]
        assert (IRNodeKind.KV_MIGRATE in kinds) == (
            i == 0 and IRNodeKind.KV_MIGRATE in [n.kind for n in plan.graph.nodes]
        )
        assert (IRNodeKind.KV_TRANSFER in kinds) == (
            i == num_micro_batches - 1
            and IRNodeKind.KV_TRANSFER in [n.kind for n in plan.graph.nodes]
        )
    for rid, pieces in seen.items():
        whole = original[rid]
        if rid in decode_ids:
            assert pieces == [whole], f"decode chunk {rid} was cut"
        assert tuple(t for c in pieces for t in c.token_ids) == whole.token_ids
        pos = whole.start_position
        for j, c in enumerate(pieces):
            assert c.start_position == pos
            pos += len(c.token_ids)
            last = j == len(pieces) - 1
            assert c.sample == (whole.sample and last), f"piece {j} of {rid} samples wrongly"
            if last and whole.sample:
                assert c.num_logits == whole.num_logits <= len(c.token_ids)
    assert set(seen) == set(original)


class OverlapSchedulerConformance:
    """Subclass and provide ``make_scheduler()`` (an implementation in its default
    configuration, which balances by token count)."""

    max_examples: ClassVar[int] = 40

    def make_scheduler(self) -> OverlapScheduler:
        raise NotImplementedError

    # -------------------------------------------------------------------- split

    def test_is_an_overlap_scheduler(self) -> None:
        assert isinstance(self.make_scheduler(), OverlapScheduler)

    def test_one_micro_batch_is_the_plan(self) -> None:
        plan = make_plan([(5, True, 1)], [1, 2])
        assert self.make_scheduler().split(plan, 1) == [plan]

    @pytest.mark.parametrize("n", [0, -1])
    def test_fewer_than_one_micro_batch_is_refused(self, n: int) -> None:
        with pytest.raises(ValueError, match="num_micro_batches"):
            self.make_scheduler().split(make_plan([(5, True, 1)], [1]), n)

    def test_more_micro_batches_than_whole_chunks_is_refused(self) -> None:
        # three decode chunks are never cut: at most three micro-batches
        with pytest.raises(ValueError, match="at most 3"):
            self.make_scheduler().split(make_plan([], [1, 2, 1]), 4)

    def test_two_micro_batches_of_a_decode_batch_are_even(self) -> None:
        parts = self.make_scheduler().split(make_plan([], [1] * 8), 2)
        assert [len(p.compute_chunks) for p in parts] == [4, 4]
        assert [c.request_id for c in parts[0].compute_chunks] == ["d0", "d1", "d2", "d3"]

    def test_split_properties(self) -> None:
        scheduler = self.make_scheduler()

        @suite_settings(self.max_examples, report_multiple_bugs=False)
        @given(
            prefill=st.lists(
                st.integers(1, 24).flatmap(
                    lambda n: st.tuples(st.just(n), st.booleans(), st.integers(1, min(n, 3)))
                ),
                max_size=4,
            ),
            decode=st.lists(st.integers(1, 3), max_size=6),
            decode_first=st.booleans(),
            migrate=st.booleans(),
            transfer=st.booleans(),
            data=st.data(),
        )
        def check(prefill, decode, decode_first, migrate, transfer, data) -> None:  # type: ignore[no-untyped-def]
            if not prefill and not decode:
                decode = [1]
            plan = make_plan(
                prefill, decode, decode_first=decode_first, migrate=migrate, transfer=transfer
            )
            # decode chunks and sampled tails are whole, so at least this many always fit
            floor = len(plan.compute_chunks)
            n = data.draw(st.integers(1, min(floor, 5)), label="num_micro_batches")
            parts = scheduler.split(plan, n)
            if n == 1:
                assert parts == [plan]
                return
            check_split(plan, parts, n)
            sizes = [sum(len(c.token_ids) for c in p.compute_chunks) for p in parts]
            total = sum(sizes)
            biggest = max(len(c.token_ids) for c in plan.compute_chunks)
            assert max(sizes) <= total / n + biggest, f"unbalanced: {sizes}"
            if all(len(c.token_ids) == 1 for c in plan.compute_chunks):
                assert max(sizes) - min(sizes) <= 1, f"unbalanced: {sizes}"

        check()

    # ----------------------------------------------------------------- schedule

    @pytest.mark.parametrize(("num_micro_batches", "num_layers"), [(1, 1), (2, 3), (3, 2), (4, 1)])
    def test_schedule_is_legal(self, num_micro_batches: int, num_layers: int) -> None:
        ops = self.make_scheduler().schedule(num_micro_batches, num_layers)
        assert all(isinstance(op, OverlapOp) for op in ops)
        assert len(ops) == 3 * num_micro_batches * num_layers
        where = {(op.kind, op.layer, op.micro_batch): i for i, op in enumerate(ops)}
        assert len(where) == len(ops), "an op is listed twice"
        C, S, W = OverlapOpKind.COMPUTE, OverlapOpKind.COMMUNICATE, OverlapOpKind.WAIT
        for layer in range(num_layers):
            for m in range(num_micro_batches):
                assert where[(C, layer, m)] < where[(S, layer, m)] < where[(W, layer, m)]
                if layer:
                    assert where[(W, layer - 1, m)] < where[(C, layer, m)]

    @pytest.mark.parametrize(("num_micro_batches", "num_layers"), [(0, 1), (1, 0)])
    def test_schedule_refuses_zero_counts(self, num_micro_batches: int, num_layers: int) -> None:
        with pytest.raises(ValueError):
            self.make_scheduler().schedule(num_micro_batches, num_layers)

    # ---------------------------------------------------------------------- run

    @staticmethod
    def _fakes(log: list[tuple[str, int, int]]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """compute/communicate on nested tuples; a waiter's result is the only value a
        compute accepts (an unwaited state is a ``("started", ...)`` marker)."""

        def compute(layer: int, m: int, state: Any) -> Any:
            assert not (isinstance(state, tuple) and state[0] == "started"), (
                f"compute({layer}, {m}) got a state whose collective was not waited"
            )
            log.append(("compute", layer, m))
            return ("c", layer, state)

        def communicate(layer: int, m: int, state: Any) -> Callable[[], Any]:
            log.append(("communicate", layer, m))
            calls = [0]

            def wait() -> Any:
                calls[0] += 1
                assert calls[0] == 1, f"waiter of ({layer}, {m}) called twice"
                log.append(("wait", layer, m))
                return ("r", layer, state)

            return wait

        return compute, communicate

    @pytest.mark.parametrize(("num_micro_batches", "num_layers"), [(1, 2), (2, 3), (3, 2)])
    def test_run_follows_its_schedule(self, num_micro_batches: int, num_layers: int) -> None:
        scheduler = self.make_scheduler()
        log: list[tuple[str, int, int]] = []
        compute, communicate = self._fakes(log)
        out = scheduler.run(list(range(num_micro_batches)), num_layers, compute, communicate)
        expect: list[Any] = list(range(num_micro_batches))
        for layer in range(num_layers):
            expect = [("r", layer, ("c", layer, s)) for s in expect]
        assert out == expect
        ops = scheduler.schedule(num_micro_batches, num_layers)
        assert log == [(op.kind.value, op.layer, op.micro_batch) for op in ops]

    def test_run_refuses_no_states(self) -> None:
        compute, communicate = self._fakes([])
        with pytest.raises(ValueError):
            self.make_scheduler().run([], 2, compute, communicate)

    def test_a_failing_compute_leaves_no_collective_running(self) -> None:
        log: list[tuple[str, int, int]] = []
        compute, communicate = self._fakes(log)

        def failing(layer: int, m: int, state: Any) -> Any:
            if (layer, m) == (1, 1):
                raise RuntimeError("compute failed")
            return compute(layer, m, state)

        with pytest.raises(RuntimeError, match="compute failed"):
            self.make_scheduler().run([0, 1], 3, failing, communicate)
        started = {(layer, m) for kind, layer, m in log if kind == "communicate"}
        waited = {(layer, m) for kind, layer, m in log if kind == "wait"}
        assert started == waited
