"""The bounded latency reservoir behind lookup_p50_us / lookup_p99_us."""

from __future__ import annotations

import pytest

from sagellm.prefix_cache.latency import LatencyReservoir


def test_keeps_everything_below_capacity() -> None:
    r = LatencyReservoir(100)
    for ns in range(1000, 101_000, 1000):  # 1..100 us
        r.add(ns)
    assert len(r) == 100 and r.num_seen == 100
    assert r.percentile_us(0.5) == 50.0
    assert r.percentile_us(0.99) == 99.0
    assert r.percentile_us(1.0) == 100.0


def test_stays_bounded_and_unbiased_beyond_capacity() -> None:
    r = LatencyReservoir(500, seed=3)
    for i in range(100_000):
        r.add(1000 * (i % 1000))  # uniform over 0..999 us
    assert len(r) == 500 and r.num_seen == 100_000
    assert 400 <= r.percentile_us(0.5) <= 600
    assert r.percentile_us(0.99) >= 950


def test_reset_and_errors() -> None:
    r = LatencyReservoir(4)
    assert r.percentile_us(0.5) == 0.0
    r.add(5)
    r.reset()
    assert len(r) == 0 and r.num_seen == 0
    with pytest.raises(ValueError, match="quantile must be in \\(0, 1\\], got 0"):
        r.percentile_us(0)
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        LatencyReservoir(0)
