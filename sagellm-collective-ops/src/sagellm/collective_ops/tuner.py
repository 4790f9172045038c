"""Algorithm choice from a cost table, after NCCL's tuner-plugin interface.

NCCL fills ``collCostTable[algorithm][protocol]`` with modelled times
(``latency + bytes / bandwidth``) and hands it to a tuner plugin's ``getCollInfo(ctx,
coll, nBytes, numPipeOps, costTable, ...)``, which may lower or disable entries; the
cheapest enabled entry runs. Here the table is ``{algorithm: microseconds}`` for one
call, built by :meth:`CostModel.table`, and a tuner is any object with
:meth:`Tuner.get_coll_info` (edit the table in place; ``math.inf`` disables an entry).

The model (per rank, ``n`` bytes, ``W`` ranks; ``step_us`` one flag round, ``mem_gbps``
the memory traffic rate of one core, ``torch_*`` the process group's own alpha-beta):

- ``shm_flat``: ``step + (W + 3) n / mem`` (copy in, then read every slot and write);
- ``shm_direct``: ``2 step + (5 - 1/W) n / mem`` (copy the peers' chunks in, reduce one
  chunk, copy the result back);
- ``torch``: ``torch_alpha + n / torch_beta``.

All ranks must choose alike, so the table depends only on its inputs and on constants
every rank shares (the priors below, or rank 0's calibration broadcast to all).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

__all__ = ["CostModel", "Tuner", "choose"]


@runtime_checkable
class Tuner(Protocol):
    """NCCL's ``getCollInfo``: adjust the cost table of one collective call."""

    def get_coll_info(
        self, coll: str, nbytes: int, world_size: int, num_pipe_ops: int, table: dict[str, float]
    ) -> None:
        """Edit ``table`` (algorithm -> modelled microseconds) in place."""
        ...


@dataclass(frozen=True, slots=True)
class CostModel:
    """Constants of the model; defaults are priors measured on a quiet 2-core EPYC guest."""

    step_us: float = 2.0  # one flag round between processes (post + wait)
    mem_gbps: float = 10.0  # memory traffic one core sustains (reads + writes), GB/s
    torch_alpha_us: float = 200.0  # gloo's fixed cost per all_reduce (200-900 us seen)
    torch_beta_gbps: float = 1.0  # gloo's all_reduce bandwidth (~1 GB/s seen)

    def traffic(self, algorithm: str, nbytes: int, world_size: int) -> float:
        """Bytes of memory traffic per rank the algorithm moves for ``nbytes``."""
        w = world_size
        if algorithm == "shm_flat":
            return (w + 3) * nbytes
        if algorithm == "shm_direct":
            # copy-in (W-1)/W n twice, reduce reads n and writes n/W, copy-back 2n
            return (2 * (w - 1) / w + 1 + 1 / w + 2) * nbytes
        raise ValueError(f"no traffic model for {algorithm!r}")

    def table(
        self, coll: str, nbytes: int, world_size: int, algorithms: Iterable[str]
    ) -> dict[str, float]:
        """Modelled microseconds of each algorithm for one call."""
        out = {}
        for a in algorithms:
            if a == "torch":
                out[a] = self.torch_alpha_us + nbytes / (self.torch_beta_gbps * 1e3)
            elif a == "shm_flat":
                out[a] = self.step_us + self.traffic(a, nbytes, world_size) / (self.mem_gbps * 1e3)
            elif a == "shm_direct" and coll == "all_reduce":
                out[a] = 2 * self.step_us + self.traffic(a, nbytes, world_size) / (
                    self.mem_gbps * 1e3
                )
        return out

    def with_measurements(self, **changes: float) -> CostModel:
        """A copy with measured constants (keys are field names)."""
        return replace(self, **changes)


def choose(table: dict[str, float]) -> str:
    """The cheapest finite entry (ties: the first listed); ValueError if all disabled."""
    best = min(table, key=lambda a: table[a], default=None)
    if best is None or not math.isfinite(table[best]):
        raise ValueError(
            f"every algorithm is disabled in the cost table {table}: a tuner left none"
        )
    return best
