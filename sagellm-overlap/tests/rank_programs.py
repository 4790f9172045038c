"""Programs the failure tests run on every rank (importable by name from the ranks)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from sagellm.overlap import MicroBatchOverlap
from sagellm.overlap.launch import RankContext


def compute_fails_on_rank_1(ctx: RankContext) -> str:
    """Rank 1's compute raises at layer 1 (after waiting the collectives it started);
    rank 0 then blocks on a collective rank 1 never starts, until run_ranks stops it."""
    xs = [torch.ones(4), torch.ones(4)]

    def compute(layer: int, m: int, x: torch.Tensor) -> torch.Tensor:
        if ctx.rank == 1 and layer == 1:
            raise RuntimeError(f"compute failed at layer {layer}, micro-batch {m}")
        return x * 2

    def communicate(layer: int, m: int, x: torch.Tensor):  # type: ignore[no-untyped-def]
        work = dist.all_reduce(x, async_op=True)
        return lambda: (work.wait(), x)[1]

    MicroBatchOverlap().run(xs, 3, compute, communicate)
    return "finished"


def sleep_forever(ctx: RankContext) -> None:
    time.sleep(3600)
