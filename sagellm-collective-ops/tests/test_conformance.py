"""core's CommBackend suite: shared memory on (2 and 4 ranks) and plain gloo (2 ranks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from sagellm.collective_ops import TorchCommBackend, run_ranks
from sagellm.core import registry
from sagellm.core.testing import CommBackendConformance


class TestSharedMemoryConformance(CommBackendConformance):
    world_sizes: ClassVar[tuple[int, ...]] = (2, 4)

    def run_ranks(self, world_size: int, program: Callable[[Any, int], Any]) -> list[Any]:
        return run_ranks(world_size, program, world_size, timeout_s=240)


class TestGlooConformance(CommBackendConformance):
    world_sizes: ClassVar[tuple[int, ...]] = (2,)

    def run_ranks(self, world_size: int, program: Callable[[Any, int], Any]) -> list[Any]:
        return run_ranks(world_size, program, world_size, options={"shm": False}, timeout_s=240)


def test_registered_under_sagellm_comm_backend() -> None:
    registry.reset_cache()
    assert registry.load_class("comm_backend", "torch") is TorchCommBackend
