"""Run a function on ``world_size`` local ranks, each with its own backend.

Used by the tests and the benchmark; a layer over :mod:`sagellm.core.testing.ranks`
(forkserver ranks with torch imported once, a file store in a temporary folder, results
pickled by value; whatever happens, every rank is stopped and the folder removed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm.core.testing.ranks import RankError, preload, run_comm_ranks

__all__ = ["RankError", "preload", "run_ranks"]


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    options: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """``fn(backend, *args)`` on each rank (``fn`` importable by name); results by rank.

    ``options`` build each rank's :class:`CollectiveConfig` of a
    :class:`TorchCommBackend`; ``threads`` is each rank's torch thread count. Raises
    :class:`RankError` with the failing ranks' tracebacks, ``TimeoutError`` when the
    ranks are not done within ``timeout_s``.
    """
    return run_comm_ranks(
        "sagellm.collective_ops.backend:TorchCommBackend",
        fn,
        world_size,
        args=args,
        options=options,
        timeout_s=timeout_s,
        threads=threads,
    )
