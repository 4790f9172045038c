"""Run a function on ``world_size`` local ranks joined by one torch.distributed group.

Used by the tests, the benchmark and the asv suite; a layer over
:mod:`sagellm.core.testing.ranks` (forkserver ranks with torch imported once, a file
store in a temporary folder, results pickled by value; whatever happens, every rank is
stopped and the folder removed) that picks gloo on CPU or nccl on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm.core.errors import PlatformUnavailableError
from sagellm.core.testing import ranks
from sagellm.core.testing.ranks import RankContext, RankError, preload

__all__ = ["RankContext", "RankError", "pick_backend", "preload", "run_ranks"]


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
    backend, kind = pick_backend(device)  # a missing CUDA is the caller's error, raised here
    return ranks.run_ranks(
        fn,
        world_size,
        args=args,
        backend=backend,
        device=kind,
        timeout_s=timeout_s,
        threads=threads,
    )
