"""Programs the multi-process tests run on each rank (importable by name)."""

from __future__ import annotations

from typing import Any


def exact_program(comm: Any, world_size: int) -> dict[str, Any]:
    """Known inputs per rank; the parent checks every result exactly."""
    import torch

    rank = comm.rank
    out: dict[str, Any] = {"rank": rank, "world_size": comm.world_size, "repr": repr(comm)}
    base = torch.tensor([1.0, -2.0, 3.0, 0.5]) * (rank + 1)
    for op in ("sum", "max", "min", "product"):
        t = base.clone()
        comm.all_reduce(t, op)
        out[op] = t
    ints = torch.arange(6, dtype=torch.int64).reshape(2, 3) + 10 * rank
    comm.all_reduce(ints)  # default op: sum; a 2-D tensor keeps its shape
    out["int_sum"] = ints
    strided = torch.zeros(4, 2)[:, 0]  # not contiguous
    strided.fill_(rank + 1)
    comm.all_reduce(strided, "sum")
    out["strided"] = strided
    gathered = torch.empty(world_size * 3, dtype=torch.int32)
    comm.all_gather(gathered, torch.tensor([rank, rank * 10, rank * 100], dtype=torch.int32))
    out["all_gather"] = gathered
    shaped = torch.empty(world_size, 2)  # output of any shape with the right size
    comm.all_gather(shaped, torch.tensor([rank + 0.5, -rank - 0.5]))
    out["all_gather_2d"] = shaped
    msg = torch.full((5,), float(rank + 7))
    got = torch.empty(5)
    peer = 1 - rank
    if rank == 0:
        comm.send(msg, peer)
        comm.recv(got, peer)
    else:
        comm.recv(got, peer)
        comm.send(msg, peer)
    out["recv"] = got
    comm.barrier()
    try:
        comm.all_reduce(torch.ones(2), "mean")
    except ValueError as exc:
        out["bad_op"] = str(exc)
    try:
        comm.all_gather(torch.empty(world_size * 3 + 1), torch.ones(3))
    except ValueError as exc:
        out["bad_gather"] = str(exc)
    try:
        comm.all_gather(torch.empty(world_size * 3, dtype=torch.int64), torch.ones(3))
    except ValueError as exc:
        out["bad_gather_dtype"] = str(exc)
    comm.close()
    comm.close()  # idempotent
    try:
        comm.all_reduce(torch.ones(1))
    except RuntimeError as exc:
        out["after_close"] = str(exc)
    return out


def hang_program(comm: Any, pid_folder: str) -> int:
    """Rank 1 never returns; both ranks leave their pid in ``pid_folder``."""
    import os
    import time

    with open(os.path.join(pid_folder, f"rank{comm.rank}"), "w") as f:
        f.write(str(os.getpid()))
    if comm.rank == 1:
        time.sleep(600)
    return comm.rank
