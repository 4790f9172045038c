"""Allocate/free latency of PagedKVPool against a pool that scans a list of free flags.

Run ``python -m sagellm.kv_pool.bench_alloc [--num-blocks 1024 65536] [--num-ops N]``.

Both pools replay the same seeded trace: first allocations until 60% of the blocks are in
use (not timed), then ``num_ops`` timed operations that keep utilization between 60% and
90%: below 60% allocate, above 90% free, in between either with equal chance. An
allocation takes 1..8 blocks; a free releases one earlier allocation picked at random, so
the free blocks scatter over the pool as in a long-running engine. Every call is timed on
its own with ``time.perf_counter_ns``; p50 and p99 are reported in microseconds, and the
ratios are ``baseline / paged`` (above 1: the paged pool is faster).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool.config import PagedKVPoolConfig
from sagellm.kv_pool.paged import PagedKVPool

__all__ = ["ListScanPool", "LatencyResult", "compare", "make_trace", "replay"]

_LOW, _HIGH = 0.6, 0.9
_MAX_BLOCKS_PER_ALLOCATION = 8


class ListScanPool:
    """Baseline: a list of free flags scanned first-fit on every allocation.

    ``list.index`` does the scan in C, so this is the fastest form of the plain-list
    design; freeing is O(blocks) as in the paged pool.
    """

    def __init__(self, num_blocks: int) -> None:
        self._is_free = [True] * num_blocks
        self._ref = [0] * num_blocks
        self._num_free = num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > self._num_free:
            return None
        is_free = self._is_free
        ref = self._ref
        out = []
        i = 0
        for _ in range(num_blocks):
            i = is_free.index(True, i)
            is_free[i] = False
            ref[i] = 1
            out.append(i)
        self._num_free -= num_blocks
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        ref = self._ref
        for b in block_ids:
            if ref[b] == 0:
                raise ValueError(f"block {b} is already free")
        for b in block_ids:
            ref[b] -= 1
            if ref[b] == 0:
                self._is_free[b] = True
                self._num_free += 1


def make_trace(num_blocks: int, num_ops: int, seed: int = 0) -> tuple[int, list[tuple[int, int]]]:
    """``(num_warmup_ops, ops)``; an op is ``(+k, 0)`` allocate k or ``(-1, i)`` free live[i].

    The trace depends only on block counts, so every pool replays it identically.
    """
    rng = random.Random(seed)
    ops: list[tuple[int, int]] = []
    live: list[int] = []  # sizes of live allocations, in the order replay keeps them
    used = 0
    warmup = None
    while warmup is None or len(ops) < warmup + num_ops:
        if warmup is None and used >= _LOW * num_blocks:
            warmup = len(ops)
            continue
        frac = used / num_blocks
        do_alloc = frac < _LOW or (frac <= _HIGH and rng.random() < 0.5)
        if do_alloc or not live:
            k = rng.randint(1, _MAX_BLOCKS_PER_ALLOCATION)
            if used + k > num_blocks:
                continue
            ops.append((k, 0))
            live.append(k)
            used += k
        else:
            i = rng.randrange(len(live))
            ops.append((-1, i))
            used -= live[i]
            live[i] = live[-1]
            live.pop()
    assert warmup is not None
    return warmup, ops


@dataclass(frozen=True)
class LatencyResult:
    """Latency percentiles of one pool over one trace, in microseconds."""

    alloc_p50_us: float
    alloc_p99_us: float
    free_p50_us: float
    free_p99_us: float


def replay(pool: object, warmup: int, ops: list[tuple[int, int]]) -> LatencyResult:
    """Run the trace on ``pool`` (allocate/free), timing each call after the warmup."""
    clock = time.perf_counter_ns
    allocate = pool.allocate  # type: ignore[attr-defined]
    free = pool.free  # type: ignore[attr-defined]
    live: list[list[int]] = []
    alloc_ns: list[int] = []
    free_ns: list[int] = []
    for n, (op, arg) in enumerate(ops):
        timed = n >= warmup
        if op > 0:
            t0 = clock()
            ids = allocate(op)
            t1 = clock()
            assert ids is not None
            live.append(ids)
            if timed:
                alloc_ns.append(t1 - t0)
        else:
            ids = live[arg]
            live[arg] = live[-1]
            live.pop()
            t0 = clock()
            free(ids)
            t1 = clock()
            if timed:
                free_ns.append(t1 - t0)
    a = np.asarray(alloc_ns, dtype=np.float64) / 1e3
    f = np.asarray(free_ns, dtype=np.float64) / 1e3
    return LatencyResult(
        alloc_p50_us=float(np.percentile(a, 50)),
        alloc_p99_us=float(np.percentile(a, 99)),
        free_p50_us=float(np.percentile(f, 50)),
        free_p99_us=float(np.percentile(f, 99)),
    )


def _tiny_paged_pool(num_blocks: int) -> PagedKVPool:
    schema = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=1, block_size=1)
    return PagedKVPool(PagedKVPoolConfig(num_blocks=num_blocks), schema=schema, device="cpu")


def compare(num_blocks: int, num_ops: int = 20_000, seed: int = 0) -> dict[str, float]:
    """Replay one trace on both pools; figures for the paged pool, the baseline and ratios."""
    warmup, ops = make_trace(num_blocks, num_ops, seed)
    paged = replay(_tiny_paged_pool(num_blocks), warmup, ops)
    base = replay(ListScanPool(num_blocks), warmup, ops)
    out: dict[str, float] = {}
    for name, res in (("paged", paged), ("baseline", base)):
        for field in ("alloc_p50_us", "alloc_p99_us", "free_p50_us", "free_p99_us"):
            out[f"{name}_{field}"] = getattr(res, field)
    for field in ("alloc_p50", "alloc_p99", "free_p50", "free_p99"):
        out[f"{field}_speedup"] = out[f"baseline_{field}_us"] / out[f"paged_{field}_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-blocks", type=int, nargs="+", default=[1024, 65536])
    parser.add_argument("--num-ops", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        "| blocks | op | paged p50 us | paged p99 us | list-scan p50 us | list-scan p99 us "
        "| p50 speedup | p99 speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.num_blocks:
        r = compare(n, args.num_ops, args.seed)
        for op in ("alloc", "free"):
            print(
                f"| {n} | {op} | {r[f'paged_{op}_p50_us']:.2f} | {r[f'paged_{op}_p99_us']:.2f} "
                f"| {r[f'baseline_{op}_p50_us']:.2f} | {r[f'baseline_{op}_p99_us']:.2f} "
                f"| {r[f'{op}_p50_speedup']:.1f}x | {r[f'{op}_p99_speedup']:.1f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
