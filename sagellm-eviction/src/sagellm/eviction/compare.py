"""Our policies next to libCacheSim's on the same key sequences.

``python -m sagellm.eviction.compare`` replays, for every trace (Zipf alpha 0.8 and 1.0,
the LLM KV trace of :mod:`sagellm.eviction.trace`), every algorithm both have (lru,
fifo, lfu, arc, s3fifo, sieve) and every cache size (fractions of the number of distinct
keys), the identical key sequence through our policy (the get loop of
:mod:`sagellm.eviction.simulate`) and through libCacheSim's Python binding (keys mapped to
dense ints, unit-size ``Request`` objects, ``cache.get``), prints both miss ratios and the
difference, and exits with status 1 when any ``|difference|`` exceeds the tolerance.
S3-FIFO runs with small_size_ratio=0.1, ghost_size_ratio=0.9, move_to_main_threshold=2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.eviction import POLICIES
from sagellm.eviction.config import KVTraceConfig
from sagellm.eviction.simulate import simulate
from sagellm.eviction.trace import kv_trace, zipf_trace

__all__ = [
    "ALGORITHMS",
    "ComparisonRow",
    "compare",
    "dense_ids",
    "format_table",
    "libcachesim_miss_ratio",
    "main",
    "standard_traces",
]

#: algorithms both sides have: name -> our policy class
ALGORITHMS: dict[str, type[Any]] = {k: v for k, v in POLICIES.items() if k != "cost_aware"}

DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 0.2)
#: libCacheSim's S3-FIFO admits nothing while its small FIFO is under 2 keys
MIN_CACHE_SIZE = 20


@dataclass(frozen=True, slots=True)
class ComparisonRow:
    trace: str
    algorithm: str
    cache_size: int  # keys
    ours: float  # our miss ratio
    libcachesim: float  # libCacheSim's miss ratio

    @property
    def difference(self) -> float:
        return self.ours - self.libcachesim


def dense_ids(keys: Sequence[Hashable]) -> list[int]:
    """Keys renamed 0, 1, 2, ... in order of first appearance."""
    ids: dict[Hashable, int] = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


def _libcachesim_cache(algorithm: str, size: int) -> Any:
    import libcachesim as lcs

    if algorithm == "s3fifo":
        return lcs.S3FIFO(
            size, small_size_ratio=0.1, ghost_size_ratio=0.9, move_to_main_threshold=2
        )
    factory: Callable[[int], Any] = {
        "lru": lcs.LRU,
        "fifo": lcs.FIFO,
        "lfu": lcs.LFU,
        "arc": lcs.ARC,
        "sieve": lcs.Sieve,
    }[algorithm]
    return factory(size)


def libcachesim_miss_ratio(algorithm: str, ids: Sequence[int], size: int) -> float:
    """libCacheSim's object miss ratio of ``ids`` (unit sizes) at ``size`` objects."""
    import libcachesim as lcs

    cache = _libcachesim_cache(algorithm, size)
    req = lcs.Request()
    req.obj_size = 1
    get = cache.get
    hits = 0
    for i in ids:
        req.obj_id = i
        hits += get(req)
    return 1.0 - hits / len(ids)


def standard_traces(quick: bool = False) -> dict[str, list[int]]:
    """The compared traces as dense int ids (``quick``: about a tenth of the size)."""
    if quick:
        zipf = {"num_objects": 2_000, "num_requests": 20_000}
        kv = KVTraceConfig(duration_seconds=120.0)
    else:
        zipf = {"num_objects": 10_000, "num_requests": 100_000}
        kv = KVTraceConfig()
    return {
        "zipf-0.8": zipf_trace(0.8, seed=1, **zipf),
        "zipf-1.0": zipf_trace(1.0, seed=2, **zipf),
        "llm-kv": dense_ids(kv_trace(kv).keys),
    }


def compare(
    traces: dict[str, list[int]],
    algorithms: Sequence[str] = tuple(ALGORITHMS),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    progress: Callable[[ComparisonRow], None] | None = None,
) -> list[ComparisonRow]:
    """One row per trace, algorithm and cache size (fractions of the distinct keys)."""
    rows = []
    for trace_name, ids in traces.items():
        distinct = len(set(ids))
        sizes = sorted({max(MIN_CACHE_SIZE, int(distinct * f)) for f in fractions})
        for algorithm in algorithms:
            for size in sizes:
                ours = simulate(ALGORITHMS[algorithm](capacity=size), ids, size).miss_ratio
                theirs = libcachesim_miss_ratio(algorithm, ids, size)
                row = ComparisonRow(trace_name, algorithm, size, ours, theirs)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


def format_row(row: ComparisonRow) -> str:
    return (
        f"{row.trace:<10} {row.algorithm:<7} {row.cache_size:>7} {row.ours:>9.5f} "
        f"{row.libcachesim:>12.5f} {row.difference:>+10.5f}"
    )


HEADER = f"{'trace':<10} {'algo':<7} {'size':>7} {'ours':>9} {'libCacheSim':>12} {'ours-lcs':>10}"


def format_table(rows: Sequence[ComparisonRow]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sagellm.eviction.compare",
        description="Miss ratios of our policies and libCacheSim's on the same traces.",
    )
    parser.add_argument("--quick", action="store_true", help="small traces (a few seconds)")
    parser.add_argument("--tolerance", type=float, default=0.005, help="largest |ours - lcs|")
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(DEFAULT_FRACTIONS),
        help="cache sizes as fractions of the distinct keys",
    )
    args = parser.parse_args(argv)
    try:
        import libcachesim  # noqa: F401
    except ImportError:
        print(
            "libcachesim is not installed: pip install 'sagellm-eviction[bench]'", file=sys.stderr
        )
        return 2
    start = time.perf_counter()
    traces = standard_traces(args.quick)
    for name, ids in traces.items():
        print(f"# {name}: {len(ids)} accesses, {len(set(ids))} distinct keys")
    print(HEADER)
    rows = compare(traces, fractions=args.fractions, progress=lambda r: print(format_row(r)))
    worst = max(rows, key=lambda r: abs(r.difference))
    per_algo = {a: max(abs(r.difference) for r in rows if r.algorithm == a) for a in ALGORITHMS}
    print(
        "# max |ours - libCacheSim| per algorithm: "
        + ", ".join(f"{a} {d:.5f}" for a, d in per_algo.items())
    )
    print(
        f"# worst: {worst.trace} {worst.algorithm} size {worst.cache_size}: "
        f"{worst.difference:+.5f} (tolerance {args.tolerance}); "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 1 if abs(worst.difference) > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
