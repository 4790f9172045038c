"""Rank programs of the overlap measurement and the equality check.

Each runs on every rank through :func:`sagellm.overlap.launch.run_ranks` and returns
plain values (pickled back to the caller). The measurement follows the honest overlap
metric: compute alone (collectives left out), communication alone (matmuls left out),
the serialised step and the overlapped step, interleaved repetition by repetition
(A B C D A B C D ...) so a change in machine load hits all four alike, and medians.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sagellm.overlap.config import OverlapConfig
from sagellm.overlap.launch import RankContext
from sagellm.overlap.scheduler import MicroBatchOverlap
from sagellm.overlap.tp_mlp import TensorParallelMLP

__all__ = ["Workload", "check_outputs", "measure", "overlap_metrics"]

VARIANTS = ("compute", "communicate", "serial", "overlap")


@dataclass(frozen=True, slots=True)
class Workload:
    """Sizes of one measured step (a tensor-parallel MLP stack over ``num_tokens``)."""

    num_layers: int = 4
    hidden_size: int = 512
    ffn_size: int = 2048
    num_tokens: int = 256
    num_micro_batches: int = 2
    seed: int = 0


def _model(ctx: RankContext, w: Workload) -> TensorParallelMLP:
    return TensorParallelMLP(
        w.num_layers, w.hidden_size, w.ffn_size, ctx.rank, ctx.world_size,
        seed=w.seed, device=ctx.device,
    )  # fmt: skip


def _inputs(w: Workload, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(w.seed + 1)
    return torch.randn(w.num_tokens, w.hidden_size, generator=gen).to(device)


def _micro(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [t.contiguous() for t in torch.tensor_split(x, n, dim=0)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(ctx: RankContext, w: Workload, reps: int, warmup: int = 1) -> dict[str, Any]:
    """Median seconds of the four variants on this rank, and each variant's breakdown
    (``<variant>_compute_s``, ``_start_s``, ``_wait_s``: time inside compute, starting
    collectives and waiting for them) from the scheduler's stats."""
    model = _model(ctx, w)
    mbs = _micro(_inputs(w, ctx.device), w.num_micro_batches)
    serial = MicroBatchOverlap(OverlapConfig(mode="serial"))
    overlap = MicroBatchOverlap(OverlapConfig(mode="overlap"))
    L = w.num_layers
    runs = {
        "compute": lambda: serial.run(mbs, L, model.compute, model.compute_without_collective),
        "communicate": lambda: serial.run(
            mbs, L, model.collective_without_compute, model.communicate
        ),
        "serial": lambda: serial.run(mbs, L, model.compute, model.communicate),
        "overlap": lambda: overlap.run(mbs, L, model.compute, model.communicate),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    # per variant: seconds inside compute(), communicate() (starting) and the waiters
    parts: dict[str, dict[str, list[float]]] = {
        v: {"compute_s": [], "start_s": [], "wait_s": []} for v in VARIANTS
    }
    for rep in range(warmup + reps):
        for v in VARIANTS:
            scheduler = overlap if v == "overlap" else serial
            scheduler.make_stats()
            dist.barrier()
            _sync(ctx.device)
            t0 = time.perf_counter()
            runs[v]()
            _sync(ctx.device)
            dt = time.perf_counter() - t0
            s = scheduler.make_stats()
            if rep < warmup:
                continue
            times[v].append(dt)
            parts[v]["compute_s"].append(s.compute_s)
            parts[v]["start_s"].append(s.start_s)
            parts[v]["wait_s"].append(s.wait_s)
    out: dict[str, Any] = {v: statistics.median(times[v]) for v in VARIANTS}
    for v in VARIANTS:
        out.update({f"{v}_{k}": statistics.median(x) for k, x in parts[v].items()})
    out["reps"] = reps
    return out


def overlap_metrics(t: dict[str, float]) -> dict[str, float]:
    """Hidden share, speedup and idle shares from one rank's :func:`measure` result.

    hidden = (T_compute + T_comm - T_overlap) / T_comm: the part of the communication
    that no longer adds to the step (negative when overlapping made the step slower
    than doing both one after the other). idle = time blocked waiting on collectives /
    step time. compute_inflation = compute time inside the overlapped step / compute
    alone: above 1 when the collective's progress threads take CPU from the matmuls.
    """
    return {
        "hidden": (t["compute"] + t["communicate"] - t["overlap"]) / t["communicate"],
        "speedup": t["serial"] / t["overlap"],
        "idle_overlap": t["overlap_wait_s"] / t["overlap"],
        "idle_serial": t["serial_wait_s"] / t["serial"],
        "compute_inflation": t["overlap_compute_s"] / t["compute_compute_s"],
    }


def check_outputs(ctx: RankContext, w: Workload) -> dict[str, Any]:
    """The serialised and overlapped outputs on the same micro-batches, the unsplit
    serialised output, the unsharded reference, and whether every collective a compute
    consumed had completed (checked on the real work handles)."""
    model = _model(ctx, w)
    x = _inputs(w, ctx.device)
    mbs = _micro(x, w.num_micro_batches)
    L = w.num_layers
    serial = MicroBatchOverlap(OverlapConfig(mode="serial"))
    overlap = MicroBatchOverlap(OverlapConfig(mode="overlap"))
    works: dict[tuple[int, int], Any] = {}
    returned: dict[tuple[int, int], int] = {}
    consumed: list[tuple[int, int, bool, bool]] = []  # layer, mb, completed, same object

    def communicate(layer: int, m: int, state: Any) -> Any:
        x_, partial = state
        work = dist.all_reduce(partial, async_op=True)
        works[(layer, m)] = work

        def wait() -> torch.Tensor:
            work.wait()
            out = x_ + partial
            returned[(layer, m)] = id(out)
            return out

        return wait

    def compute(layer: int, m: int, x_: torch.Tensor) -> Any:
        if layer > 0:
            prev = (layer - 1, m)
            consumed.append(
                (layer, m, bool(works[prev].is_completed()), returned.get(prev) == id(x_))
            )
        return model.compute(layer, m, x_)

    got_overlap = overlap.run(mbs, L, compute, communicate)
    stats = overlap.make_stats()
    got_serial = model.forward(serial, mbs)
    whole = model.forward(serial, [x])[0]
    reference = TensorParallelMLP(w.num_layers, w.hidden_size, w.ffn_size, seed=w.seed)
    ref = reference.forward(serial, [x.cpu()])[0]
    return {
        "overlap": [t.cpu() for t in got_overlap],
        "serial": [t.cpu() for t in got_serial],
        "whole": whole.cpu(),
        "reference": ref,
        "consumed": consumed,
        "num_collectives": stats.num_collectives,
        "backend": ctx.backend,
    }
