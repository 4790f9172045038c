"""Run a function on ``world_size`` local ranks, each with its own communication backend.

A layer over :mod:`sagellm.core.testing.ranks` (forkserver ranks, a file store in a
temporary folder, results pickled by value; whatever happens, every rank is stopped and
the folder removed before this returns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm.core.testing.ranks import RankError, run_comm_ranks

__all__ = ["RankError", "run_ranks"]


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
    Raises :class:`RankError` with the failing ranks' tracebacks and ``TimeoutError``
    when the ranks are not done within ``timeout_s``.
    """
    return run_comm_ranks(
        backend_class,
        fn,
        world_size,
        args=args,
        options=options,
        context={"backend": backend},
        timeout_s=timeout_s,
    )
