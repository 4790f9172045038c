"""Run a function on ``world_size`` local ranks, each with its own communication backend.

Ranks are fresh processes (``spawn``) that rendezvous through a file store in a temporary
folder and return their results pickled. Whatever happens (an error, a hang past
``timeout_s``), every rank is stopped and the folder removed before this returns.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["RankError", "run_ranks"]


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def _rank_main(
    rank: int,
    world_size: int,
    init_method: str,
    backend_path: str,
    options: dict[str, Any],
    backend: str | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:  # pragma: no cover - runs in the child
    import importlib

    import torch

    torch.set_num_threads(1)
    module, _, attr = backend_path.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    comm = None
    try:
        comm = cls(
            cls.config_class(**options),
            rank=rank,
            world_size=world_size,
            init_method=init_method,
            backend=backend,
        )
        payload = (rank, "ok", pickle.dumps(fn(comm, *args)))
    except BaseException:
        payload = (rank, "error", pickle.dumps(traceback.format_exc()))
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:
                pass
    results.put(payload)


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    backend_class: str = "sagellm.domestic_interconnect.comm:HcclCommBackend",
    backend: str | None = None,
    options: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> list[Any]:
    """``fn(comm, *args)`` on each rank (``fn`` importable by name); results in rank order.

    ``backend_class`` is ``"module:Class"`` of the backend each rank builds from
    ``options``; ``backend`` overrides its torch.distributed backend name (``"gloo"``).
    Raises :class:`RankError` with the first failing rank's traceback and
    ``TimeoutError`` when the ranks are not done within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="sagellm-di-ranks-")
    init_method = "file://" + os.path.join(folder, "store")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                r,
                world_size,
                init_method,
                backend_class,
                dict(options or {}),
                backend,
                fn,
                args,
                results,
            ),
            daemon=True,
        )
        for r in range(world_size)
    ]
    got: dict[int, tuple[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s"
                )
            try:
                rank, status, blob = results.get(timeout=min(left, 0.5))
            except queue_mod.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got
                ]
                if dead:
                    raise RankError(
                        f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                        "before returning"
                    ) from None
                continue
            got[rank] = (status, pickle.loads(blob))
    finally:
        complete = len(got) == world_size
        for p in procs:
            if p.pid is None:
                continue
            if complete:
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
            p.join()
        results.close()
        results.join_thread()
        shutil.rmtree(folder, ignore_errors=True)
    for rank in range(world_size):
        status, value = got[rank]
        if status == "error":
            raise RankError(f"rank {rank} failed:\n{value}")
    return [got[r][1] for r in range(world_size)]
