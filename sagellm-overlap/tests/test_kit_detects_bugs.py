"""Core's OverlapSchedulerConformance fails for schedulers that break the protocol."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from sagellm.core.testing import OverlapSchedulerConformance
from sagellm.core.types import ExecutionPlan, IRGraph, OverlapOp, OverlapOpKind
from sagellm.overlap import MicroBatchOverlap


def _fails(scheduler: type[MicroBatchOverlap], method: str, *args: Any) -> None:
    class Suite(OverlapSchedulerConformance):
        max_examples = 30

        def make_scheduler(self) -> MicroBatchOverlap:
            return scheduler()

    with pytest.raises((AssertionError, pytest.fail.Exception)):
        getattr(Suite(), method)(*args)


class DropsLastToken(MicroBatchOverlap):
    def split(self, plan: ExecutionPlan, num_micro_batches: int) -> list[ExecutionPlan]:
        parts = super().split(plan, num_micro_batches)
        last = parts[-1]
        nodes = list(last.graph.nodes)
        for i in reversed(range(len(nodes))):
            if nodes[i].chunks:
                chunk = nodes[i].chunks[-1]
                if len(chunk.token_ids) > 1:
                    short = dataclasses.replace(chunk, token_ids=chunk.token_ids[:-1])
                    nodes[i] = dataclasses.replace(nodes[i], chunks=nodes[i].chunks[:-1] + (short,))
                break
        return parts[:-1] + [dataclasses.replace(last, graph=IRGraph(tuple(nodes)))]


class Reversed(MicroBatchOverlap):
    def split(self, plan: ExecutionPlan, num_micro_batches: int) -> list[ExecutionPlan]:
        return super().split(plan, num_micro_batches)[::-1]


class MissingWait(MicroBatchOverlap):
    def schedule(self, num_micro_batches: int, num_layers: int) -> tuple[OverlapOp, ...]:
        ops = super().schedule(num_micro_batches, num_layers)
        return tuple(op for op in ops if not (op.kind is OverlapOpKind.WAIT and op.layer == 0))


class UsesUnwaitedState(MicroBatchOverlap):
    def run(
        self,
        states: Sequence[Any],
        num_layers: int,
        compute: Callable[[int, int, Any], Any],
        communicate: Callable[[int, int, Any], Callable[[], Any]],
    ) -> list[Any]:
        current = list(states)
        for layer in range(num_layers):
            for m in range(len(current)):
                waiter = communicate(layer, m, compute(layer, m, current[m]))
                current[m] = ("started", waiter)  # forgets to wait before the next compute
        return [w() for _, w in current]


class LeavesCollectivesRunning(MicroBatchOverlap):
    def run(
        self,
        states: Sequence[Any],
        num_layers: int,
        compute: Callable[[int, int, Any], Any],
        communicate: Callable[[int, int, Any], Callable[[], Any]],
    ) -> list[Any]:
        # the right order, but an error leaves the started collectives unwaited
        current, pending = list(states), {}
        for op in self.schedule(len(current), num_layers):
            m = op.micro_batch
            if op.kind is OverlapOpKind.COMPUTE:
                current[m] = compute(op.layer, m, current[m])
            elif op.kind is OverlapOpKind.COMMUNICATE:
                pending[m] = communicate(op.layer, m, current[m])
            else:
                current[m] = pending.pop(m)()
        return current


def test_a_lost_token_fails_the_split_properties() -> None:
    _fails(DropsLastToken, "test_split_properties")


def test_reversed_micro_batches_fail_the_order_check() -> None:
    _fails(Reversed, "test_two_micro_batches_of_a_decode_batch_are_even")


def test_a_missing_wait_fails_the_schedule_check() -> None:
    _fails(MissingWait, "test_schedule_is_legal", 2, 2)


def test_using_an_unwaited_state_fails_the_run_check() -> None:
    _fails(UsesUnwaitedState, "test_run_follows_its_schedule", 2, 3)


def test_unwaited_collectives_after_an_error_fail_the_cleanup_check() -> None:
    _fails(LeavesCollectivesRunning, "test_a_failing_compute_leaves_no_collective_running")


def test_the_reference_passes_what_the_broken_ones_fail() -> None:
    class Suite(OverlapSchedulerConformance):
        def make_scheduler(self) -> MicroBatchOverlap:
            return MicroBatchOverlap()

    suite = Suite()
    suite.test_two_micro_batches_of_a_decode_batch_are_even()
    suite.test_schedule_is_legal(2, 2)
    suite.test_run_follows_its_schedule(2, 3)
    suite.test_a_failing_compute_leaves_no_collective_running()
