"""CommBackendConformance passes a correct backend and fails broken ones.

The backends here are in-process fakes: ranks are threads that meet at a barrier.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from sagellm.core.testing import CommBackendConformance

torch = pytest.importorskip("torch")

OPS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": lambda a, b: a + b,
    "max": torch.maximum,
    "min": torch.minimum,
    "product": lambda a, b: a * b,
}


class World:
    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[Any] = [None] * size
        self.mail: dict[tuple[int, int], queue.Queue[Any]] = {
            (a, b): queue.Queue() for a in range(size) for b in range(size)
        }


class ThreadBackend:
    def __init__(self, world: World, rank: int) -> None:
        self.world = world
        self._rank = rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self.world.size

    def _exchange(self, t: Any) -> list[Any]:
        self.world.slots[self._rank] = t.clone()
        self.world.barrier.wait()
        every = list(self.world.slots)
        self.world.barrier.wait()
        return every

    def reduce(self, xs: list[Any], op: str) -> Any:
        acc = xs[0]
        for x in xs[1:]:
            acc = OPS[op](acc, x)
        return acc

    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}: use one of {', '.join(OPS)}")
        tensor.copy_(self.reduce(self._exchange(tensor), op))

    def all_gather(self, output: Any, tensor: Any) -> None:
        if output.numel() != self.world.size * tensor.numel():
            raise ValueError("all_gather output has the wrong size")
        output.copy_(torch.cat(self._exchange(tensor)))

    def send(self, tensor: Any, dst: int) -> None:
        self.world.mail[(self._rank, dst)].put(tensor.clone())

    def recv(self, tensor: Any, src: int) -> None:
        tensor.copy_(self.world.mail[(src, self._rank)].get(timeout=30))

    def barrier(self) -> None:
        self.world.barrier.wait()

    def close(self) -> None:
        pass


def _run_threads(
    backend_class: type, world_size: int, program: Callable[[Any, int], Any]
) -> list[Any]:
    world = World(world_size)
    results: list[Any] = [None] * world_size

    def rank_main(r: int) -> None:
        results[r] = program(backend_class(world, r), world_size)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


class TestThreadBackendConformance(CommBackendConformance):
    world_sizes: ClassVar[tuple[int, ...]] = (2, 3)

    def run_ranks(self, world_size: int, program: Callable[[Any, int], Any]) -> list[Any]:
        return _run_threads(ThreadBackend, world_size, program)


class MaxIsSum(ThreadBackend):
    def reduce(self, xs: list[Any], op: str) -> Any:
        return super().reduce(xs, "sum" if op == "max" else op)


class RankOrderDiffers(ThreadBackend):
    """Adds starting from its own rank: float results differ by rounding between ranks."""

    def reduce(self, xs: list[Any], op: str) -> Any:
        r = self._rank
        return super().reduce(xs[r:] + xs[:r], op)


class AcceptsAnyOp(ThreadBackend):
    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        super().all_reduce(tensor, op if op in OPS else "sum")


def _suite(backend_class: type, sizes: tuple[int, ...] = (2,)) -> CommBackendConformance:
    class Suite(CommBackendConformance):
        world_sizes = sizes

        def run_ranks(self, world_size: int, program: Callable[[Any, int], Any]) -> list[Any]:
            return _run_threads(backend_class, world_size, program)

    return Suite()


def test_suite_fails_a_wrong_reduction() -> None:
    with pytest.raises(AssertionError, match="max"):
        _suite(MaxIsSum).test_all_reduce_matches_reference()


def test_suite_fails_ranks_that_disagree() -> None:
    with pytest.raises(AssertionError, match="differs from rank 0"):
        _suite(RankOrderDiffers, (3,)).test_all_reduce_identical_on_every_rank()


def test_suite_fails_an_unchecked_op() -> None:
    with pytest.raises(AssertionError, match="an unknown op must raise ValueError"):
        _suite(AcceptsAnyOp).test_bad_input_raises_value_error()
