"""Run a function on ``world_size`` local ranks joined by one torch.distributed group.

Used by the tests, the benchmark and the asv suite. Ranks are processes started from a
forkserver that has imported torch once (fast starts); they rendezvous through a file
store in a temporary folder (no port to pick) and return their results pickled by
value. Whatever happens (an error, a hang past ``timeout_s``), every rank is stopped and
the folder removed before :func:`run_ranks` returns.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagellm.core.errors import PlatformUnavailableError

__all__ = ["RankContext", "RankError", "pick_backend", "preload", "run_ranks"]


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback or exit code."""


@dataclass(frozen=True, slots=True)
class RankContext:
    """What a rank program receives as its first argument."""

    rank: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    device: str  # torch device of this rank: "cpu" or "cuda:<i>"


def pick_backend(device: str) -> tuple[str, str]:
    """``(backend, device type)`` for ``device`` in ``{"auto", "cpu", "cuda"}``.

    ``auto`` takes nccl on CUDA when torch sees a GPU and was built with nccl, else gloo
    on CPU. Raises PlatformUnavailableError when ``cuda`` is asked for and absent.
    """
    import torch
    import torch.distributed as dist

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if device == "cuda" and not cuda:
        raise PlatformUnavailableError(
            "device='cuda' needs a CUDA build of torch with nccl and a visible GPU "
            f"(torch {torch.__version__}, cuda available: {torch.cuda.is_available()}); "
            "use device='cpu' for gloo on CPU"
        )
    if device == "cuda" or (device == "auto" and cuda):
        return "nccl", "cuda"
    return "gloo", "cpu"


def _rank_main(
    rank: int,
    world_size: int,
    init_method: str,
    device: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    threads: int,
    timeout_s: float,
) -> None:  # pragma: no cover - runs in the child
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        backend, kind = pick_backend(device)
        where = "cpu"
        if kind == "cuda":
            where = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(where)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        value = fn(RankContext(rank, world_size, backend, where), *args)
        payload = (rank, "ok", pickle.dumps(value))
    except BaseException:
        payload = (rank, "error", pickle.dumps(traceback.format_exc()))
    # report before tearing the group down: the peers see the closed connection after
    results.put(payload)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: S110 - the result is already reported
            pass


_CTX: Any = None
_ERROR_GRACE_S = 1.0
_PRELOAD = ["torch", "torch.distributed", "sagellm.overlap.launch"]


def preload(modules: list[str]) -> None:
    """Also import ``modules`` in the forkserver, once (call before the first
    :func:`run_ranks`; later calls change nothing)."""
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
    device: str = "cpu",
    timeout_s: float = 60.0,
    threads: int = 1,
) -> list[Any]:
    """``fn(ctx, *args)`` on each rank (``fn`` importable by name); results by rank.

    ``ctx`` is a :class:`RankContext`; the default process group is initialised
    (gloo on CPU, nccl on CUDA, see :func:`pick_backend`). ``threads`` is each rank's
    torch thread count. Raises :class:`RankError` with the traceback of every rank that
    failed (ranks failing within a second of the first are gathered, so a peer's
    "connection closed" comes with its cause), ``TimeoutError`` when the ranks are not
    done within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pick_backend(device)  # a missing CUDA is the caller's error, raised here
    preload([fn.__module__])
    ctx = _context()
    folder = tempfile.mkdtemp(prefix="sagellm-overlap-")
    init_method = "file://" + os.path.join(folder, "store")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world_size, init_method, device, fn, args, results, threads, timeout_s),
            daemon=True,
        )
        for r in range(world_size)
    ]
    got: dict[int, tuple[str, Any]] = {}
    errors: list[int] = []  # ranks that raised, in the order their reports arrived
    error_deadline = 0.0
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(got) < world_size:
            now = time.monotonic()
            if errors and now >= error_deadline:
                break  # the others are likely blocked on the failed rank: stop them
            left = deadline - now
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish within {timeout_s:g} s"
                )
            try:
                rank, status, blob = results.get(timeout=min(left, 0.25))
            except queue_mod.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got
                ]
                if dead and not errors:
                    raise RankError(
                        f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before returning"
                    ) from None
                continue
            got[rank] = (status, pickle.loads(blob))
            if status == "error":
                if not errors:
                    # a peer of the failed rank often fails next (closed connection):
                    # gather what arrives shortly so the report holds the first cause too
                    error_deadline = time.monotonic() + _ERROR_GRACE_S
                errors.append(rank)
        if errors:
            raise RankError("\n".join(f"rank {r} failed:\n{got[r][1]}" for r in sorted(errors)))
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
    return [got[r][1] for r in range(world_size)]
