"""Run a producer and a consumer program in two local processes, for tests and benchmarks.

``run_pair(producer_fn, consumer_fn, ...)`` forks both from a forkserver that imported
torch once, builds a :class:`HostKVPool` and a channel in each (the producer on port 0,
its address handed to the consumer), calls ``fn(channel, pool, link, *args)`` and returns
each side's :class:`Outcome`. ``link`` carries small objects between the two programs
(``put(obj)``, ``get(timeout_s)``). Whatever happens (an error, a side killed, a hang
past ``timeout_s``), both processes are stopped and joined before this returns.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CHANNELS", "Link", "Outcome", "PairError", "run_pair"]

#: Channel name -> (module, class, config class), as the entry points name them.
CHANNELS: dict[str, tuple[str, str, str]] = {
    "torch": ("sagellm.kv_transfer.torch_channel", "TorchKVChannel", "TorchChannelConfig"),
    "mooncake": ("sagellm.kv_transfer.mooncake", "MooncakeKVChannel", "MooncakeChannelConfig"),
    "nixl": ("sagellm.kv_transfer.nixl", "NixlKVChannel", "NixlChannelConfig"),
}


class PairError(RuntimeError):
    """A side of :func:`run_pair` failed; the message holds its traceback or exit code."""


@dataclass(frozen=True)
class Outcome:
    """How one side ended: ``status`` is ``ok`` (``value`` returned), ``error``
    (``value`` is the traceback), ``exit`` (``value`` is the exit code) or ``timeout``."""

    status: str
    value: Any


class Link:
    """Small objects between the two programs of a pair."""

    def __init__(self, out_q: Any, in_q: Any) -> None:
        self._out, self._in = out_q, in_q

    def put(self, obj: Any) -> None:
        """Hand ``obj`` to the other side."""
        self._out.put(obj)

    def get(self, timeout_s: float = 30.0) -> Any:
        """The next object the other side put; ``TimeoutError`` after ``timeout_s``."""
        try:
            return self._in.get(timeout=timeout_s)
        except queue_mod.Empty:
            raise TimeoutError(f"the other side sent nothing within {timeout_s:g} s") from None


def _side(
    role: str,
    kind: str,
    schema_json: str,
    num_blocks: int,
    options: dict[str, Any],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    to_peer: Any,
    from_peer: Any,
    results: Any,
    threads: int,
) -> None:  # pragma: no cover - runs in the child
    import importlib

    import torch

    from sagellm.core.types import KVCacheSchema
    from sagellm.kv_transfer.host_pool import HostKVPool, HostKVPoolConfig

    torch.set_num_threads(threads)
    channel = None
    link = Link(to_peer, from_peer)
    try:
        module, cls_name, cfg_name = CHANNELS[kind]
        mod = importlib.import_module(module)
        cls = getattr(mod, cls_name)
        cfg_cls = getattr(importlib.import_module("sagellm.kv_transfer.config"), cfg_name)
        schema = KVCacheSchema.model_validate_json(schema_json)
        pool = HostKVPool(HostKVPoolConfig(num_blocks=num_blocks), schema=schema)
        opts = dict(options)
        if role == "producer":
            channel = cls(cfg_cls(role="producer", address="127.0.0.1:0", **opts), pool=pool)
            link.put(channel.address)
        else:
            address = link.get(60.0)
            channel = cls(cfg_cls(role="consumer", address=address, **opts), pool=pool)
        value = fn(channel, pool, link, *args)
        payload = (role, "ok", pickle.dumps(value))
    except BaseException:
        payload = (role, "error", pickle.dumps(traceback.format_exc()))
    finally:
        if channel is not None:
            try:
                channel.close()
            except Exception:
                pass
    results.put(payload)


_CTX: Any = None
_PRELOAD = ["torch", "torch.distributed", "sagellm.kv_transfer.torch_channel"]


def _context(modules: list[str]) -> Any:
    global _CTX
    if _CTX is None:
        _PRELOAD.extend(m for m in modules if m not in _PRELOAD)
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(list(_PRELOAD))
    return _CTX


def run_pair(
    producer_fn: Callable[..., Any],
    consumer_fn: Callable[..., Any],
    *args: Any,
    schema: Any,
    num_blocks: int = 16,
    options: dict[str, Any] | None = None,
    producer_options: dict[str, Any] | None = None,
    consumer_options: dict[str, Any] | None = None,
    kind: str = "torch",
    timeout_s: float = 60.0,
    threads: int = 1,
    check: bool = True,
) -> tuple[Outcome, Outcome]:
    """Run both programs (importable by name); outcomes of (producer, consumer).

    ``options`` go to both sides' channel config, ``producer_options`` /
    ``consumer_options`` to one. ``check``: raise :class:`PairError` unless both
    returned. A side still running after ``timeout_s`` is killed (``timeout``).
    """
    if kind not in CHANNELS:
        raise ValueError(f"unknown channel {kind!r}; channels: {', '.join(CHANNELS)}")
    ctx = _context([producer_fn.__module__, consumer_fn.__module__])
    p2c, c2p, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    schema_json = schema.model_dump_json()
    sides = {
        "producer": (producer_fn, {**(options or {}), **(producer_options or {})}, p2c, c2p),
        "consumer": (consumer_fn, {**(options or {}), **(consumer_options or {})}, c2p, p2c),
    }
    procs = {
        role: ctx.Process(
            target=_side,
            args=(
                role,
                kind,
                schema_json,
                num_blocks,
                opts,
                fn,
                args,
                out_q,
                in_q,
                results,
                threads,
            ),
            daemon=True,
        )
        for role, (fn, opts, out_q, in_q) in sides.items()
    }
    got: dict[str, Outcome] = {}
    try:
        for p in procs.values():
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                role, status, blob = results.get(timeout=0.2)
                got[role] = Outcome(status, pickle.loads(blob))
            except queue_mod.Empty:
                for role, p in procs.items():
                    if role not in got and p.exitcode is not None:
                        # a side that died without reporting (killed, os._exit)
                        time.sleep(0.05)
                        try:
                            while True:
                                r, status, blob = results.get_nowait()
                                got[r] = Outcome(status, pickle.loads(blob))
                        except queue_mod.Empty:
                            pass
                        if role not in got:
                            got[role] = Outcome("exit", p.exitcode)
    finally:
        for role, p in procs.items():
            if p.pid is None:
                continue
            if p.is_alive():
                p.kill()
                got.setdefault(role, Outcome("timeout", timeout_s))
            p.join(timeout=10)
        for q in (p2c, c2p, results):
            q.close()
            q.join_thread()
    out = (
        got.get("producer", Outcome("timeout", timeout_s)),
        got.get("consumer", Outcome("timeout", timeout_s)),
    )
    if check:
        for role, o in zip(("producer", "consumer"), out):
            if o.status != "ok":
                raise PairError(f"{role} {o.status}: {o.value}")
    return out


def kill_self() -> None:
    """End the calling process at once, as a crash would (tests of a vanished peer)."""
    os._exit(17)
