"""asv: allocate/free latency of PagedKVPool against a list-scan pool, same seeded trace.

Both pools replay one trace per size (see ``sagellm.kv_pool.bench_alloc``); every call is
timed with ``time.perf_counter_ns``. ``track_*_us`` report percentiles in microseconds,
``track_*_speedup`` report ``baseline / paged`` (above 1: the paged pool is faster).
"""

from __future__ import annotations

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig
from sagellm.kv_pool.bench_alloc import ListScanPool, compare

SIZES = [1024, 65536]
NUM_OPS = 20_000
SEED = 0


class AllocFreeLatency:
    """p50/p99 latency of allocate and free, paged pool vs list-scan baseline."""

    params = SIZES
    param_names = ["num_blocks"]
    timeout = 600

    def setup_cache(self) -> dict[int, dict[str, float]]:
        return {n: compare(n, NUM_OPS, SEED) for n in SIZES}

    setup_cache.timeout = 600  # type: ignore[attr-defined]

    def track_paged_alloc_p50_us(self, r: dict, n: int) -> float:
        return r[n]["paged_alloc_p50_us"]

    def track_paged_alloc_p99_us(self, r: dict, n: int) -> float:
        return r[n]["paged_alloc_p99_us"]

    def track_paged_free_p50_us(self, r: dict, n: int) -> float:
        return r[n]["paged_free_p50_us"]

    def track_paged_free_p99_us(self, r: dict, n: int) -> float:
        return r[n]["paged_free_p99_us"]

    def track_baseline_alloc_p50_us(self, r: dict, n: int) -> float:
        return r[n]["baseline_alloc_p50_us"]

    def track_baseline_alloc_p99_us(self, r: dict, n: int) -> float:
        return r[n]["baseline_alloc_p99_us"]

    def track_baseline_free_p50_us(self, r: dict, n: int) -> float:
        return r[n]["baseline_free_p50_us"]

    def track_baseline_free_p99_us(self, r: dict, n: int) -> float:
        return r[n]["baseline_free_p99_us"]

    def track_alloc_p50_speedup_vs_baseline(self, r: dict, n: int) -> float:
        return r[n]["alloc_p50_speedup"]

    def track_alloc_p99_speedup_vs_baseline(self, r: dict, n: int) -> float:
        return r[n]["alloc_p99_speedup"]

    def track_free_p50_speedup_vs_baseline(self, r: dict, n: int) -> float:
        return r[n]["free_p50_speedup"]

    def track_free_p99_speedup_vs_baseline(self, r: dict, n: int) -> float:
        return r[n]["free_p99_speedup"]


for _name in list(vars(AllocFreeLatency)):
    if _name.startswith("track_"):
        getattr(AllocFreeLatency, _name).unit = "us" if _name.endswith("_us") else "ratio"


class AllocateFreeCycle:
    """Time of one allocate(4) + free cycle with the first half of the pool held.

    Long-lived sequences hold the low block ids, so a first-fit scan walks past them on
    every allocation; the paged pool pops its free stack.
    """

    params = (SIZES, ["paged", "list-scan"])
    param_names = ["num_blocks", "pool"]

    def setup(self, n: int, kind: str) -> None:
        if kind == "paged":
            schema = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=1, block_size=1)
            self.pool = PagedKVPool(PagedKVPoolConfig(num_blocks=n), schema=schema)
        else:
            self.pool = ListScanPool(n)
        self.held = self.pool.allocate(n // 2)

    def time_allocate_free(self, n: int, kind: str) -> None:
        ids = self.pool.allocate(4)
        self.pool.free(ids)
