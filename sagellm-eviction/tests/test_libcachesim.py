"""Our policies reproduce libCacheSim's miss ratios on the same key sequences."""

from __future__ import annotations

import pytest

from sagellm.eviction.compare import ALGORITHMS, compare, dense_ids, libcachesim_miss_ratio
from sagellm.eviction.config import KVTraceConfig
from sagellm.eviction.trace import kv_trace, zipf_trace

pytest.importorskip("libcachesim")


@pytest.fixture(scope="module")
def traces() -> dict[str, list[int]]:
    return {
        "zipf-0.8": zipf_trace(0.8, num_objects=1000, num_requests=8000, seed=3),
        "zipf-1.0": zipf_trace(1.0, num_objects=1000, num_requests=8000, seed=4),
        "llm-kv": dense_ids(kv_trace(KVTraceConfig(duration_seconds=60.0, seed=5)).keys),
    }


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_miss_ratios_agree_within_half_a_percent(
    algorithm: str, traces: dict[str, list[int]]
) -> None:
    rows = compare(traces, algorithms=[algorithm], fractions=(0.02, 0.1, 0.3))
    assert len(rows) == 9
    for row in rows:
        assert abs(row.difference) <= 0.005, row


def test_the_reference_sees_every_request() -> None:
    # all distinct: every access misses on both sides
    assert libcachesim_miss_ratio("lru", list(range(100)), 20) == 1.0


def test_dense_ids_follow_first_appearance() -> None:
    assert dense_ids(["x", "y", "x", "z"]) == [0, 1, 0, 2]
