"""Run a producer and a consumer program in two local processes, for tests and benchmarks.

``run_pair(producer_fn, consumer_fn, ...)`` runs both as the two ranks of
:func:`sagellm.core.testing.ranks.run_programs` (forkserver processes with torch imported
once), builds a :class:`HostKVPool` and a channel in each (the producer on port 0, its
address handed to the consumer), calls ``fn(channel, pool, link, *args)`` and returns
each side's :class:`Outcome`. ``link`` carries small objects between the two programs
(``put(obj)``, ``get(timeout_s)``). Whatever happens (an error, a side killed, a hang
past ``timeout_s``), both processes are stopped and joined before this returns.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from typing import Any

from sagellm.core.testing.ranks import RankContext, preload, run_programs
from sagellm.core.testing.ranks import RankOutcome as Outcome

__all__ = ["CHANNELS", "Link", "Outcome", "PairError", "preload", "run_pair"]

#: Channel name -> (module, class, config class), as the entry points name them.
CHANNELS: dict[str, tuple[str, str, str]] = {
    "torch": ("sagellm.kv_transfer.torch_channel", "TorchKVChannel", "TorchChannelConfig"),
    "mooncake": ("sagellm.kv_transfer.mooncake", "MooncakeKVChannel", "MooncakeChannelConfig"),
    "nixl": ("sagellm.kv_transfer.nixl", "NixlKVChannel", "NixlChannelConfig"),
}
ROLES = ("producer", "consumer")  # rank 0, rank 1


class PairError(RuntimeError):
    """A side of :func:`run_pair` failed; the message holds its traceback or exit code."""


class Link:
    """Small objects between the two programs of a pair."""

    def __init__(self, ctx: RankContext) -> None:
        self._ctx = ctx

    def put(self, obj: Any) -> None:
        """Hand ``obj`` to the other side."""
        self._ctx.send(1 - self._ctx.rank, obj)

    def get(self, timeout_s: float = 30.0) -> Any:
        """The next object the other side put; ``TimeoutError`` after ``timeout_s``."""
        return self._ctx.recv(timeout_s)


def _side(
    ctx: RankContext,
    kind: str,
    schema_json: str,
    num_blocks: int,
    options: dict[str, Any],
    fn: Callable[..., Any],
    *args: Any,
) -> Any:  # pragma: no cover - runs in the child
    from sagellm.core.types import KVCacheSchema
    from sagellm.kv_transfer.host_pool import HostKVPool, HostKVPoolConfig

    link = Link(ctx)
    module, cls_name, cfg_name = CHANNELS[kind]
    cls = getattr(importlib.import_module(module), cls_name)
    cfg_cls = getattr(importlib.import_module("sagellm.kv_transfer.config"), cfg_name)
    schema = KVCacheSchema.model_validate_json(schema_json)
    pool = HostKVPool(HostKVPoolConfig(num_blocks=num_blocks), schema=schema)
    if ROLES[ctx.rank] == "producer":
        channel = cls(cfg_cls(role="producer", address="127.0.0.1:0", **options), pool=pool)
        link.put(channel.address)
    else:
        address = link.get(60.0)
        channel = cls(cfg_cls(role="consumer", address=address, **options), pool=pool)
    try:
        return fn(channel, pool, link, *args)
    finally:
        with contextlib.suppress(Exception):  # the program's result or error matters more
            channel.close()


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
    returned. A side still running after ``timeout_s`` is killed (``timeout``); a side
    that ends without returning (killed, ``os._exit``) is ``exit``, and the other side
    runs on.
    """
    if kind not in CHANNELS:
        raise ValueError(f"unknown channel {kind!r}; channels: {', '.join(CHANNELS)}")
    preload(["sagellm.kv_transfer.torch_channel", producer_fn.__module__, consumer_fn.__module__])
    schema_json = schema.model_dump_json()
    sides = [(producer_fn, producer_options), (consumer_fn, consumer_options)]
    programs = [
        (_side, (kind, schema_json, num_blocks, {**(options or {}), **(own or {})}, fn, *args))
        for fn, own in sides
    ]
    p, c = run_programs(programs, timeout_s=timeout_s, threads=threads, stop_on_error=False)
    if check:
        for role, o in zip(ROLES, (p, c)):
            if o.status != "ok":
                raise PairError(f"{role} {o.status}: {o.value}")
    return p, c


def kill_self() -> None:
    """End the calling process at once, as a crash would (tests of a vanished peer)."""
    os._exit(17)
