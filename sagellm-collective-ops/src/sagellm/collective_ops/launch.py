"""Run a function on ``world_size`` local ranks, each with its own backend.

Used by the tests and the benchmark. Ranks are processes forked from a forkserver that
has imported torch once (fast starts), rendezvous through a file store in a temporary
folder, and return their results pickled by value. Whatever happens (an error, a hang
past ``timeout_s``), every rank is stopped and the folder removed before this returns.
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

__all__ = ["RankError", "preload", "run_ranks"]


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


def _rank_main(
    rank: int,
    world_size: int,
    init_method: str,
    options: dict[str, Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    threads: int,
) -> None:  # pragma: no cover - runs in the child
    import torch

    from sagellm.collective_ops.backend import TorchCommBackend
    from sagellm.collective_ops.config import CollectiveConfig

    torch.set_num_threads(threads)
    backend = None
    try:
        backend = TorchCommBackend(
            CollectiveConfig(**options), rank=rank, world_size=world_size, init_method=init_method
        )
        value = fn(backend, *args)
        payload = (rank, "ok", pickle.dumps(value))
    except BaseException:
        payload = (rank, "error", pickle.dumps(traceback.format_exc()))
    finally:
        if backend is not None:
            try:
                backend.close()
            except Exception:
                pass
    results.put(payload)


_CTX: Any = None
_PRELOAD = ["torch", "sagellm.collective_ops.backend"]


def preload(modules: list[str]) -> None:
    """Also import ``modules`` in the forkserver, once, so ranks start without importing
    them (call before the first :func:`run_ranks`; later calls change nothing)."""
    if _CTX is None:
        _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(list(_PRELOAD))
    return _CTX


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    options: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """``fn(backend, *args)`` on each rank (``fn`` importable by name); results by rank.

    ``options`` build each rank's :class:`CollectiveConfig`; ``threads`` is each rank's
    torch thread count. Raises :class:`RankError` with the first failing rank's
    traceback, ``TimeoutError`` when the ranks are not done within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    preload([fn.__module__])
    ctx = _context()
    folder = tempfile.mkdtemp(prefix="sagellm-ranks-")
    init_method = "file://" + os.path.join(folder, "store")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world_size, init_method, dict(options or {}), fn, args, results, threads),
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
                rank, status, blob = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got
                ]
                if dead:
                    raise RankError(
                        f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before returning"
                    ) from None
                continue
            got[rank] = (status, pickle.loads(blob))
    finally:
        complete = len(got) == world_size
        for p in procs:
            if p.pid is None:
                continue
            if complete:
                p.join(timeout=5)  # ranks that returned are exiting
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
