"""Micro-batch overlap of asynchronous collectives with compute.

Anchor: SGLang's two-batch overlap (TBO) and vLLM's dual-batch overlap (DBO). Both cut
the step's batch in two and, layer by layer, start one half's collective (MoE
all-to-all, tensor-parallel all-reduce) before computing the other half, so the
collective's latency hides under that compute. SGLang interleaves the halves in one
thread with explicit yield points; vLLM runs two micro-batch threads that hand a token
back and forth. Here one thread walks an explicit schedule (plain data, see
:meth:`MicroBatchOverlap.schedule`) over any number of micro-batches; the collectives
are asynchronous work handles (``torch.distributed`` ``async_op=True``), not CUDA
streams, so the same order works on gloo over CPU and on nccl over CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sagellm.core.types import ExecutionPlan, OverlapOp, OverlapOpKind
from sagellm.overlap.config import OverlapConfig
from sagellm.overlap.split import split_plan

__all__ = ["MicroBatchOverlap", "OverlapStats", "hidden_under"]

_C, _S, _W = OverlapOpKind.COMPUTE, OverlapOpKind.COMMUNICATE, OverlapOpKind.WAIT


@dataclass(frozen=True, slots=True)
class OverlapStats:
    """Counters since the previous :meth:`MicroBatchOverlap.make_stats` call."""

    num_runs: int  # calls of run()
    num_collectives: int  # collectives started (one per layer and micro-batch)
    compute_s: float  # seconds inside compute()
    start_s: float  # seconds inside communicate() (starting the collectives)
    wait_s: float  # seconds blocked in waiters: the communication left visible
    run_s: float  # wall seconds of run() in total


def hidden_under(
    schedule: Sequence[OverlapOp],
) -> dict[tuple[int, int], tuple[tuple[int, int], ...]]:
    """For each collective ``(layer, micro_batch)``, the ``(layer, micro_batch)`` computes
    the schedule runs between its start and its wait (what it can hide under)."""
    open_: dict[tuple[int, int], list[tuple[int, int]]] = {}
    out: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
    for op in schedule:
        key = (op.layer, op.micro_batch)
        if op.kind is _S:
            open_[key] = []
        elif op.kind is _W:
            out[key] = tuple(open_.pop(key))
        else:
            for under in open_.values():
                under.append(key)
    return out


class _Pending:
    """Marks a state whose collective has started but not been waited."""


_PENDING = _Pending()


class MicroBatchOverlap:
    """core's ``OverlapScheduler``: balanced micro-batches, a TBO-order executor.

    ``split`` follows :func:`sagellm.overlap.split.split_plan`. In ``overlap`` mode the
    schedule is, per layer, every micro-batch in turn: wait for its previous layer's
    collective, compute, start this layer's collective. So with two micro-batches the
    collective of one runs under the compute of the other, as in SGLang's TBO. In
    ``serial`` mode each collective is waited right after it starts.
    """

    config_class: ClassVar[type[OverlapConfig]] = OverlapConfig

    def __init__(self, config: OverlapConfig | None = None) -> None:
        self.config = config or OverlapConfig()
        self._reset()

    def _reset(self) -> None:
        self._runs = self._collectives = 0
        self._compute_s = self._start_s = self._wait_s = self._run_s = 0.0

    def split(self, plan: ExecutionPlan, num_micro_batches: int) -> list[ExecutionPlan]:
        """Balanced micro-batches of ``plan``; see the protocol and :mod:`.split`."""
        return split_plan(
            plan,
            num_micro_batches,
            split_prefill=self.config.split_prefill,
            attention_weight=self.config.attention_weight,
        )

    def schedule(self, num_micro_batches: int, num_layers: int) -> tuple[OverlapOp, ...]:
        """The execution order of :meth:`run` (see the class docstring)."""
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        ops: list[OverlapOp] = []
        for layer in range(num_layers):
            for m in range(num_micro_batches):
                if self.config.mode == "overlap" and layer > 0:
                    ops.append(OverlapOp(_W, layer - 1, m))
                ops.append(OverlapOp(_C, layer, m))
                ops.append(OverlapOp(_S, layer, m))
                if self.config.mode == "serial":
                    ops.append(OverlapOp(_W, layer, m))
        if self.config.mode == "overlap":
            ops.extend(OverlapOp(_W, num_layers - 1, m) for m in range(num_micro_batches))
        return tuple(ops)

    def run(
        self,
        states: Sequence[Any],
        num_layers: int,
        compute: Callable[[int, int, Any], Any],
        communicate: Callable[[int, int, Any], Callable[[], Any]],
    ) -> list[Any]:
        """Execute :meth:`schedule` over ``states``; see the protocol for the contract."""
        if len(states) == 0:
            raise ValueError("run needs at least one micro-batch state, got none")
        ops = self.schedule(len(states), num_layers)
        current: list[Any] = list(states)
        pending: dict[int, Callable[[], Any]] = {}
        clock = time.perf_counter
        begin = clock()
        try:
            for op in ops:
                m = op.micro_batch
                t0 = clock()
                if op.kind is _C:
                    assert current[m] is not _PENDING, "compute before its collective was waited"
                    current[m] = compute(op.layer, m, current[m])
                    self._compute_s += clock() - t0
                elif op.kind is _S:
                    pending[m] = communicate(op.layer, m, current[m])
                    current[m] = _PENDING
                    self._collectives += 1
                    self._start_s += clock() - t0
                else:
                    waiter = pending.pop(m)
                    current[m] = waiter()
                    self._wait_s += clock() - t0
        except BaseException:
            # the peers started these collectives too: finish them so none is left running
            for waiter in pending.values():
                try:
                    waiter()
                except Exception:  # noqa: S110 - the first error is the one to report
                    pass
            raise
        finally:
            self._runs += 1
            self._run_s += clock() - begin
        assert not pending and not any(s is _PENDING for s in current)
        return current

    def make_stats(self) -> OverlapStats:
        """Counters since the previous call (then reset)."""
        stats = OverlapStats(
            num_runs=self._runs,
            num_collectives=self._collectives,
            compute_s=self._compute_s,
            start_s=self._start_s,
            wait_s=self._wait_s,
            run_s=self._run_s,
        )
        self._reset()
        return stats
