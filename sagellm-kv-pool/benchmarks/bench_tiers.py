"""asv: TieredKVStore migration bandwidth against raw copies of the same bytes, same run.

See ``sagellm.kv_pool.bench_tiers``: memory moves are compared with ``tensor.copy_`` of
the same bytes, disk moves with one raw ``pwrite``/``preadv`` of the same bytes.
``track_*_gbps`` report GB/s, ``track_*_ratio`` report store / raw (1.0 = raw speed).
"""

from __future__ import annotations

from sagellm.kv_pool.bench_tiers import measure

NUM_BLOCKS = 64
REPEATS = 7


class MigrationBandwidth:
    """Median bandwidth of 64-block moves (SmolLM2-135M KV schema, 23.6 MB per move)."""

    timeout = 600

    def setup_cache(self) -> dict[str, float]:
        return measure(NUM_BLOCKS, REPEATS)

    setup_cache.timeout = 600  # type: ignore[attr-defined]

    def track_device_to_host_gbps(self, r: dict) -> float:
        return r["device_to_host_gbps"]

    def track_host_to_device_gbps(self, r: dict) -> float:
        return r["host_to_device_gbps"]

    def track_host_to_disk_gbps(self, r: dict) -> float:
        return r["host_to_disk_gbps"]

    def track_disk_to_device_gbps(self, r: dict) -> float:
        return r["disk_to_device_gbps"]

    def track_raw_memcpy_gbps(self, r: dict) -> float:
        return r["raw_memcpy_gbps"]

    def track_raw_file_write_gbps(self, r: dict) -> float:
        return r["raw_file_write_gbps"]

    def track_raw_file_read_gbps(self, r: dict) -> float:
        return r["raw_file_read_gbps"]

    def track_device_to_host_ratio_vs_memcpy(self, r: dict) -> float:
        return r["device_to_host_ratio"]

    def track_host_to_device_ratio_vs_memcpy(self, r: dict) -> float:
        return r["host_to_device_ratio"]

    def track_host_to_disk_ratio_vs_file_write(self, r: dict) -> float:
        return r["host_to_disk_ratio"]

    def track_disk_to_device_ratio_vs_file_read(self, r: dict) -> float:
        return r["disk_to_device_ratio"]


for _name in list(vars(MigrationBandwidth)):
    if _name.startswith("track_"):
        getattr(MigrationBandwidth, _name).unit = "GB/s" if _name.endswith("_gbps") else "ratio"
