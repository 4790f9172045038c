"""asv benchmarks of sagellm.collective_ops (two local ranks, one thread each).

One launch in ``setup_cache`` runs ``sagellm.collective_ops.bench.bench_rank`` at 4 KiB and
1 MiB; the ``track_*`` methods report from it: the best shared-memory all-reduce's
median time at 4 KiB and gloo's in the same run, and the all-reduce bus bandwidth at
1 MiB as a fraction of the shared-memory exchange's (the copy ceiling). ``Bucketing``
times the packing of DDP-style buckets for a model's worth of tensors.
"""

from __future__ import annotations

from typing import Any

from sagellm.collective_ops import assign_buckets, run_ranks
from sagellm.collective_ops.bench import bench_rank


class SharedMemoryAllReduce:
    timeout = 300

    def setup_cache(self) -> dict[str, Any]:
        # the rank function must be importable in the rank processes: the package's own
        rows = run_ranks(2, bench_rank, [4096, 1 << 20], 200, 1 << 20, timeout_s=280)[0]["rows"]
        return {row["bytes"]: row for row in rows}

    def track_allreduce_4k_us(self, rows: dict[int, Any]) -> float:
        r = rows[4096]
        return min(r["shm_flat"][0], r["shm_direct"][0]) * 1e6

    track_allreduce_4k_us.unit = "us"  # type: ignore[attr-defined]

    def track_gloo_allreduce_4k_us(self, rows: dict[int, Any]) -> float:
        return float(rows[4096]["gloo"][0]) * 1e6

    track_gloo_allreduce_4k_us.unit = "us"  # type: ignore[attr-defined]

    def track_busbw_ratio_1m(self, rows: dict[int, Any]) -> float:
        r = rows[1 << 20]
        best = min(r["shm_flat"][0], r["shm_direct"][0])
        # two ranks: all-reduce busbw = S/t, exchange busbw = S/t_exchange
        return float(r["exchange"][0] / best)

    track_busbw_ratio_1m.unit = "ratio"  # type: ignore[attr-defined]


class Bucketing:
    def setup(self) -> None:
        # 30 layers x 9 tensors, sizes of a small model's gradients (bytes)
        self.sizes = [576 * 4, 576 * 576 * 4, 192 * 576 * 4, 192 * 576 * 4, 576 * 576 * 4,
                      576 * 4, 1536 * 576 * 4, 1536 * 576 * 4, 576 * 1536 * 4] * 30  # fmt: skip
        self.kinds = ["float32"] * len(self.sizes)

    def time_assign_buckets(self) -> None:
        assign_buckets(self.sizes, self.kinds, 25 << 20)
