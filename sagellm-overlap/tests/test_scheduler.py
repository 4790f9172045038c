"""MicroBatchOverlap's schedule, executor, stats, config and entry point (one process)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sagellm.core import registry
from sagellm.core.types import OverlapOp, OverlapOpKind
from sagellm.overlap import MicroBatchOverlap, OverlapConfig, hidden_under

C, S, W = OverlapOpKind.COMPUTE, OverlapOpKind.COMMUNICATE, OverlapOpKind.WAIT


def _ops(*ops: tuple[OverlapOpKind, int, int]) -> tuple[OverlapOp, ...]:
    return tuple(OverlapOp(k, layer, m) for k, layer, m in ops)


def test_two_batch_overlap_order() -> None:
    ops = MicroBatchOverlap().schedule(2, 2)
    assert ops == _ops(
        (C, 0, 0), (S, 0, 0), (C, 0, 1), (S, 0, 1),
        (W, 0, 0), (C, 1, 0), (S, 1, 0), (W, 0, 1), (C, 1, 1), (S, 1, 1),
        (W, 1, 0), (W, 1, 1),
    )  # fmt: skip
    # each collective hides under the other micro-batch's next compute, except the last
    assert hidden_under(ops) == {
        (0, 0): ((0, 1),),
        (0, 1): ((1, 0),),
        (1, 0): ((1, 1),),
        (1, 1): (),
    }


def test_serial_order_hides_nothing() -> None:
    ops = MicroBatchOverlap(OverlapConfig(mode="serial")).schedule(2, 1)
    assert ops == _ops((C, 0, 0), (S, 0, 0), (W, 0, 0), (C, 0, 1), (S, 0, 1), (W, 0, 1))
    assert hidden_under(ops) == {(0, 0): (), (0, 1): ()}


def test_three_micro_batches_hide_under_two_computes() -> None:
    under = hidden_under(MicroBatchOverlap().schedule(3, 2))
    assert under[(0, 0)] == ((0, 1), (0, 2))
    assert under[(0, 2)] == ((1, 0), (1, 1))
    assert under[(1, 2)] == ()


@pytest.mark.parametrize(
    ("n", "layers", "message"),
    [
        (0, 1, "num_micro_batches must be >= 1, got 0"),
        (2, 0, "num_layers must be >= 1, got 0"),
    ],
)
def test_schedule_errors(n: int, layers: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        MicroBatchOverlap().schedule(n, layers)


def test_run_errors_and_stats() -> None:
    s = MicroBatchOverlap()
    with pytest.raises(ValueError, match="^run needs at least one micro-batch state, got none$"):
        s.run([], 1, lambda layer, m, x: x, lambda layer, m, x: lambda: x)
    out = s.run([1, 2], 3, lambda layer, m, x: x * 10, lambda layer, m, x: lambda: x + 1)
    assert out == [1111, 2111]
    stats = s.make_stats()
    assert (stats.num_runs, stats.num_collectives) == (1, 6)  # the refused call is no run
    assert stats.run_s >= stats.compute_s + stats.start_s + stats.wait_s >= 0
    assert s.make_stats().num_collectives == 0  # reset


def test_a_failing_waiter_still_waits_the_others() -> None:
    waited: list[tuple[int, int]] = []

    def communicate(layer: int, m: int, x: Any) -> Any:
        def wait() -> Any:
            waited.append((layer, m))
            if (layer, m) == (0, 0):
                raise RuntimeError("peer gone")
            return x

        return wait

    with pytest.raises(RuntimeError, match="^peer gone$"):
        MicroBatchOverlap().run([0, 0], 2, lambda layer, m, x: x, communicate)
    assert waited == [(0, 0), (0, 1)]


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError, match="mode"):
        OverlapConfig(mode="pipelined")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="attention_weight"):
        OverlapConfig(attention_weight=-1.0)


def test_entry_point_builds_the_scheduler() -> None:
    s = registry.load("sagellm.overlap", "micro_batch", {"mode": "serial"})
    assert isinstance(s, MicroBatchOverlap)
    assert s.config == OverlapConfig(mode="serial")
