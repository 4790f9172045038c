"""The benchmark functions run and report consistent figures (tiny sizes)."""

from __future__ import annotations

from pathlib import Path

from sagellm.kv_pool.bench_alloc import ListScanPool, compare, make_trace, replay


def test_trace_is_seeded_and_keeps_utilization_in_band() -> None:
    warmup, ops = make_trace(256, 300, seed=1)
    assert (warmup, ops) == make_trace(256, 300, seed=1)
    assert len(ops) == warmup + 300
    assert make_trace(256, 300, seed=2) != (warmup, ops)


def test_list_scan_baseline_is_first_fit() -> None:
    pool = ListScanPool(6)
    assert pool.allocate(3) == [0, 1, 2]
    pool.free([1])
    assert pool.allocate(2) == [1, 3]
    assert pool.allocate(3) is None
    assert pool.num_free_blocks == 2


def test_compare_reports_both_pools_and_ratios() -> None:
    r = compare(128, num_ops=300, seed=0)
    assert r["alloc_p50_speedup"] == r["baseline_alloc_p50_us"] / r["paged_alloc_p50_us"]
    assert all(v > 0 for v in r.values())
    warmup, ops = make_trace(128, 50)
    assert replay(ListScanPool(128), warmup, ops).alloc_p99_us > 0


def test_tier_bandwidth_measure_runs(tmp_path: Path) -> None:
    from sagellm.kv_pool.bench_tiers import measure

    r = measure(num_blocks=2, repeats=1, directory=str(tmp_path))
    for key in ("device_to_host", "host_to_device", "host_to_disk", "disk_to_device"):
        assert r[f"{key}_gbps"] > 0
        assert r[f"{key}_ratio"] > 0
    assert list(tmp_path.iterdir()) == []  # the disk tier file and the raw file are gone
