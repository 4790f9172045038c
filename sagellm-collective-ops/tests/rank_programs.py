"""Programs the tests run on every rank (importable by name from the rank processes)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from sagellm.core.testing.comm import rank_input

DTYPES = ("float32", "float64", "bfloat16", "float16", "int32", "int64", "uint8")
SIZES = (1, 4097, 70_000)
OPS = ("sum", "max", "min")
_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _input(rank: int, n: int, dtype: str) -> torch.Tensor:
    if dtype == "uint8":  # small values: sums of four stay below 256
        return (rank_input(rank, n, "int64").abs() % 60).to(torch.uint8)
    return rank_input(rank, n, dtype)


def against_gloo(backend: Any) -> dict[str, Any]:
    """Each shared-memory algorithm next to gloo's all_reduce/all_gather of the same input."""
    out: dict[str, Any] = {}
    rank = backend.rank
    for dtype in DTYPES:
        for n in SIZES:
            for op in OPS:
                ref = _input(rank, n, dtype)
                dist.all_reduce(ref, op=_TORCH_OPS[op])
                for algorithm in ("shm_flat", "shm_direct"):
                    x = _input(rank, n, dtype)
                    backend._shm.all_reduce(x, op, algorithm)
                    out[f"{algorithm}/{dtype}/{n}/{op}"] = (x, ref)
            x = _input(rank, n, dtype)
            got = torch.empty(backend.world_size * n, dtype=x.dtype)
            parts = [torch.empty_like(x) for _ in range(backend.world_size)]
            backend.all_gather(got, x)
            dist.all_gather(parts, x)  # gloo's list form as the reference
            ref = torch.cat(parts)
            out[f"all_gather/{dtype}/{n}"] = (got, ref)
    # a non-contiguous tensor and a 2-D one through the backend's own choice
    base = _input(rank, 64, "float32").view(8, 8)
    ref = base.t().contiguous()
    dist.all_reduce(ref)
    t = base.t()
    backend.all_reduce(t)
    out["transposed"] = (t.contiguous(), ref)
    out["stats"] = backend.make_stats().calls
    return out


def skip_one(backend: Any) -> str:
    """Rank 1 skips the all_reduce rank 0 makes and stays alive past rank 0's timeout:
    rank 0 must time out, not hang."""
    if backend.rank == 0:
        backend.all_reduce(torch.ones(16))
        return "returned"
    time.sleep(4.0)
    return "skipped"


def exit_one(ctx: Any) -> str:
    """Rank 1 exits instead of joining rank 0's all_reduce: rank 0 must fail at once.

    Takes the launcher's context (it builds its own backend), so rank 0's outcome is
    reported even though rank 1 never returns."""
    from sagellm.collective_ops.backend import TorchCommBackend
    from sagellm.collective_ops.config import CollectiveConfig

    backend = TorchCommBackend(
        CollectiveConfig(timeout_s=60.0),
        rank=ctx.rank,
        world_size=ctx.world_size,
        init_method=ctx.init_method,
    )
    if ctx.rank == 1:
        os._exit(3)
    t0 = time.monotonic()
    try:
        backend.all_reduce(torch.ones(16))
    except RuntimeError as exc:
        return f"{exc} after {time.monotonic() - t0:.1f} s"
    return "returned"


def nothing(backend: Any) -> int:
    return backend.rank


def sleep_forever(backend: Any) -> None:
    time.sleep(3600)


def coalesced(backend: Any, cap_bytes: int) -> dict[str, Any]:
    """Fused all-reduce of mixed tensors next to one all-reduce per tensor."""
    from sagellm.collective_ops import Bucketer, all_reduce_coalesced

    rank = backend.rank
    shapes = [(3,), (100,), (7, 9), (1000,), (2,), (50, 20), (1,)]
    dtypes = ["float32", "float32", "int64", "float32", "bfloat16", "float32", "int64"]

    def make() -> list[torch.Tensor]:
        return [
            _input(rank, int(torch.tensor(s).prod()), d).view(s) for s, d in zip(shapes, dtypes)
        ]

    singles = make()
    for t in singles:
        backend.all_reduce(t)
    backend.make_stats()
    fused = make()
    num = all_reduce_coalesced(backend, fused, cap_bytes=cap_bytes)
    calls = sum(backend.make_stats().calls.values())
    streamed = make()
    bucketer = Bucketer(backend, cap_bytes=cap_bytes)
    issued = [bucketer.add(t) for t in streamed]
    issued.append(bucketer.flush())
    return {
        "singles": singles,
        "fused": fused,
        "num_buckets": num,
        "calls": calls,
        "streamed": streamed,
        "issued": issued,
        "bucketer_total": bucketer.num_collectives,
    }


class DropShm:
    """A tuner that disables both shared-memory algorithms."""

    def get_coll_info(
        self, coll: str, nbytes: int, world_size: int, num_pipe_ops: int, table: dict[str, float]
    ) -> None:
        for name in ("shm_flat", "shm_direct"):
            if name in table:
                table[name] = float("inf")


def misc(backend: Any, cap_bytes: int) -> dict[str, Any]:
    """coalesced() then tuned(): one launch for both."""
    return {"coalesced": coalesced(backend, cap_bytes), "tuned": tuned(backend)}


def tuned(backend: Any) -> dict[str, Any]:
    """The choice per size from the cost table, then with a tuner that drops shm."""
    backend.make_stats()
    sizes = [16, 4096, 40_000, 1 << 20]
    choices = {n: backend.choose("all_reduce", torch.empty(n // 4)) for n in sizes}
    gather = backend.choose("all_gather", torch.empty(1024))
    backend.tuner = DropShm()
    x = torch.ones(100)
    backend.all_reduce(x)
    return {"choices": choices, "gather": gather, "after_tuner": backend.make_stats().calls, "x": x}
