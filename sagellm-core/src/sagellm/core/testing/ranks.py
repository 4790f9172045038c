"""Run programs on local ranks: the launcher of the multi-process tests and benchmarks.

::

    from sagellm.core.testing.ranks import RankContext, run_ranks

    def program(ctx: RankContext, n: int) -> int:  # importable by name
        return ctx.rank * n

    run_ranks(program, 2, args=(10,))  # [0, 10]
    run_ranks(all_reduce_program, 4, backend="gloo")  # default process group set up

Ranks are processes started from a forkserver that has imported torch (when installed),
this module and whatever :func:`preload` names once, so a rank starts in milliseconds
rather than the seconds an import of torch takes. They rendezvous through a file store in
a temporary folder (no port to pick or leave bound), may hand each other small objects
(:meth:`RankContext.send` / :meth:`RankContext.recv`) and return their results pickled
by value. Whatever happens (an error, a rank killed, a hang past ``timeout_s``), every
rank is stopped and joined and the folder removed before a launcher returns.

:func:`run_ranks` runs one program on every rank and raises on the first sign of
trouble; :func:`run_comm_ranks` gives each rank a built
:class:`~sagellm.core.protocols.CommBackend`; :func:`run_programs` runs a program of its
own on each rank (a producer and a consumer, say) and reports how each one ended.

This module needs neither pytest nor torch; torch is imported only inside the ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Program",
    "RankContext",
    "RankError",
    "RankOutcome",
    "preload",
    "run_comm_ranks",
    "run_programs",
    "run_ranks",
]

#: One rank's program: ``fn(ctx, *args)`` runs there (``fn`` importable by name).
Program = tuple[Callable[..., Any], tuple[Any, ...]]

DEVICES = ("cpu", "cuda")
# After a rank fails, what the others report within this long is kept: a peer of the
# failed rank often fails next (connection closed), and the report should hold the cause.
ERROR_GRACE_S = 1.0
# Ranks that all reported get this long to exit on their own before they are killed.
EXIT_GRACE_S = 5.0


class RankError(RuntimeError):
    """A rank raised or died; the message holds its traceback or exit code."""


@dataclass(frozen=True, slots=True)
class RankContext:
    """What a rank program receives as its first argument."""

    rank: int
    world_size: int
    backend: str | None  # torch.distributed backend of the default group; None: no group
    device: str  # torch device of this rank: "cpu" or "cuda:<i>"
    init_method: str  # this launch's rendezvous, for a program that makes its own group
    inboxes: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # one per rank

    def send(self, rank: int, obj: Any) -> None:
        """Put ``obj`` (small: it travels pickled through a pipe) in ``rank``'s inbox."""
        self.inboxes[rank].put(obj)

    def recv(self, timeout_s: float = 30.0) -> Any:
        """The next object another rank sent to this one; ``TimeoutError`` after ``timeout_s``."""
        try:
            return self.inboxes[self.rank].get(timeout=timeout_s)
        except queue_mod.Empty:
            raise TimeoutError(
                f"rank {self.rank} received nothing within {timeout_s:g} s"
            ) from None


@dataclass(frozen=True, slots=True)
class RankOutcome:
    """How one rank of :func:`run_programs` ended.

    ``status`` is ``ok`` (``value`` is what the program returned), ``error`` (``value``
    is its traceback text), ``exit`` (the process ended without reporting; ``value`` is
    its exit code), ``timeout`` (still running at the deadline and killed; ``value`` is
    ``timeout_s``) or ``stopped`` (killed because another rank failed; ``value`` is
    ``None``).
    """

    status: str
    value: Any


_PRELOAD = ["torch", "torch.distributed", __name__]
_CTX: Any = None


def preload(modules: Iterable[str]) -> None:
    """Also import ``modules`` in the forkserver, once, so ranks start with them imported.

    Call it before the first launch of the process (a ``conftest.py`` is the place);
    once the server runs, later calls change nothing. A module that fails to import there
    is skipped (a rank then imports it when it unpickles its program).
    """
    if _CTX is None:
        _PRELOAD.extend(m for m in dict.fromkeys(modules) if m not in _PRELOAD)


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(list(_PRELOAD))
    return _CTX


def _rank_main(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str | None,
    device: str,
    env: dict[str, str],
    threads: int,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    inboxes: tuple[Any, ...],
    results: Any,
) -> None:  # pragma: no cover - runs in the child
    # the forkserver's environment is the parent's when the first launch started
    os.environ.update(env)
    try:
        import torch
    except ImportError:  # ranks without torch run plain Python programs
        pass
    else:
        torch.set_num_threads(threads)
    try:
        where = "cpu"
        if device == "cuda":
            import torch

            where = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(where)
        if backend is not None:
            import torch.distributed as dist

            dist.init_process_group(
                backend,
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        ctx = RankContext(rank, world_size, backend, where, init_method, inboxes)
        # pickled here, not in the queue's feeder thread, so an unpicklable result is
        # reported as this rank's error instead of being lost
        payload = (rank, "ok", pickle.dumps(fn(ctx, *args)))
    except BaseException:
        payload = (rank, "error", pickle.dumps(traceback.format_exc()))
    # report before tearing the group down: the peers see the closed connection after
    results.put(payload)
    if backend is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: S110 - the result is already reported
                pass


def _drain(results: Any, got: dict[int, RankOutcome]) -> None:
    """Read every report already sent (a rank that exited may have reported first)."""
    while True:
        try:
            rank, status, blob = results.get(timeout=0.05)
        except queue_mod.Empty:
            return
        got[rank] = RankOutcome(status, pickle.loads(blob))


def run_programs(
    programs: Sequence[Program],
    *,
    timeout_s: float = 60.0,
    backend: str | None = None,
    device: str = "cpu",
    env: Mapping[str, str] | None = None,
    threads: int = 1,
    stop_on_error: bool = True,
) -> list[RankOutcome]:
    """Run ``fn(ctx, *args)`` of ``programs[r]`` on rank ``r``; how each rank ended.

    ``ctx`` is the rank's :class:`RankContext`. ``backend`` (``"gloo"``, ``"nccl"``):
    the default torch.distributed group is set up before the program runs, with
    ``timeout_s`` as its timeout, and destroyed after; ``None``: no group (a program may
    make its own on ``ctx.init_method``). ``device="cuda"`` gives rank ``r`` GPU
    ``r % device_count``. Ranks see the parent's environment as it is now plus ``env``
    (set before the program runs, after torch was imported), and use ``threads`` torch
    threads. ``stop_on_error``: once a rank failed (raised or died), the others are
    stopped after a grace second (``stopped``); otherwise every rank runs until it ends
    or ``timeout_s`` passes (``timeout``). Never raises for what a rank did.
    """
    if not programs:
        raise ValueError("programs must hold one (fn, args) per rank, got none")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    preload(m for fn, _ in programs if (m := getattr(fn, "__module__", None)))
    ctx = _context()
    world_size = len(programs)
    ranks_env = {**os.environ, **(env or {})}
    folder = tempfile.mkdtemp(prefix="sagellm-ranks-")
    init_method = "file://" + os.path.join(folder, "store")
    results = ctx.Queue()
    inboxes = tuple(ctx.Queue() for _ in programs)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                r,
                world_size,
                init_method,
                backend,
                device,
                ranks_env,
                threads,
                timeout_s,
                fn,
                tuple(args),
                inboxes,
                results,
            ),
            daemon=True,
        )
        for r, (fn, args) in enumerate(programs)
    ]
    got: dict[int, RankOutcome] = {}
    stop_at = float("inf")  # set when a rank fails: the others get ERROR_GRACE_S
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(got) < world_size:
            now = time.monotonic()
            if now >= min(deadline, stop_at):
                break
            try:
                rank, status, blob = results.get(timeout=min(deadline, stop_at, now + 0.25) - now)
                got[rank] = RankOutcome(status, pickle.loads(blob))
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in got and p.exitcode is not None:
                        _drain(results, got)
                        if r not in got:  # killed, os._exit: it never reported
                            got[r] = RankOutcome("exit", p.exitcode)
            failed = any(o.status in ("error", "exit") for o in got.values())
            if stop_on_error and failed and stop_at == float("inf"):
                stop_at = time.monotonic() + ERROR_GRACE_S
    finally:
        # ranks that all reported are exiting: let them; any other is killed at once
        grace = EXIT_GRACE_S if len(got) == world_size else 0.0
        for p in procs:
            if p.pid is None:
                continue
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
            p.join()
        for q in (results, *inboxes):
            q.close()
            q.join_thread()
        shutil.rmtree(folder, ignore_errors=True)
    if stop_at == float("inf"):
        late = RankOutcome("timeout", timeout_s)
    else:
        late = RankOutcome("stopped", None)
    return [got.get(r, late) for r in range(world_size)]


def _raise_for(outcomes: list[RankOutcome], timeout_s: float) -> list[Any]:
    failed = []
    for r, o in enumerate(outcomes):
        if o.status == "error":
            failed.append(f"rank {r} failed:\n{o.value}")
        elif o.status == "exit":
            failed.append(f"rank {r} exited with code {o.value} before returning")
    if failed:
        raise RankError("\n".join(failed))
    late = [r for r, o in enumerate(outcomes) if o.status == "timeout"]
    if late:
        raise TimeoutError(f"ranks {late} of {len(outcomes)} did not finish within {timeout_s:g} s")
    return [o.value for o in outcomes]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    timeout_s: float = 60.0,
    backend: str | None = None,
    device: str = "cpu",
    env: Mapping[str, str] | None = None,
    threads: int = 1,
) -> list[Any]:
    """``fn(ctx, *args)`` on ``world_size`` ranks (``fn`` importable by name); results
    in rank order.

    ``ctx`` is the rank's :class:`RankContext`; ``backend``, ``device``, ``env`` and
    ``threads`` as in :func:`run_programs`. Raises :class:`RankError` with the traceback
    of every rank that failed (or the exit code of one that died; ranks failing within a
    second of the first are gathered, the rest are stopped) and ``TimeoutError`` naming
    the ranks not done within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    outcomes = run_programs(
        [(fn, tuple(args))] * world_size,
        timeout_s=timeout_s,
        backend=backend,
        device=device,
        env=env,
        threads=threads,
    )
    return _raise_for(outcomes, timeout_s)


def _with_comm(
    ctx: RankContext,
    backend_class: str | type,
    options: dict[str, Any],
    context: dict[str, Any],
    fn: Callable[..., Any],
    *args: Any,
) -> Any:  # pragma: no cover - runs in the child
    cls: Any = backend_class
    if isinstance(backend_class, str):
        module, _, name = backend_class.partition(":")
        cls = getattr(importlib.import_module(module), name)
    config_class = getattr(cls, "config_class", None)
    if config_class is None and options:
        raise ValueError(f"{cls.__name__} has no config_class: it takes no options")
    config = () if config_class is None else (config_class(**options),)
    comm = cls(
        *config, rank=ctx.rank, world_size=ctx.world_size, init_method=ctx.init_method, **context
    )
    try:
        return fn(comm, *args)
    finally:
        with contextlib.suppress(Exception):  # the program's result or error matters more
            comm.close()


def run_comm_ranks(
    backend_class: str | type,
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    options: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
    threads: int = 1,
) -> list[Any]:
    """``fn(comm, *args)`` on ``world_size`` ranks, ``comm`` a
    :class:`~sagellm.core.protocols.CommBackend` built on each; results in rank order.

    ``backend_class`` is the class or ``"module:Class"`` (imported in the ranks); each
    rank builds ``cls(cls.config_class(**options), rank=, world_size=, init_method=,
    **context)`` on this launch's rendezvous (as the registry builds an implementation)
    and closes it after ``fn``. Errors as in :func:`run_ranks`.
    """
    if isinstance(backend_class, str):
        preload([backend_class.partition(":")[0]])
    else:
        preload([backend_class.__module__])
    preload([fn.__module__])
    return run_ranks(
        _with_comm,
        world_size,
        args=(backend_class, dict(options or {}), dict(context or {}), fn, *args),
        timeout_s=timeout_s,
        env=env,
        threads=threads,
    )
