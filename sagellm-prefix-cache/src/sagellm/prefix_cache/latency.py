"""Bounded reservoir of lookup latencies for the p50/p99 of ``make_stats()``."""

from __future__ import annotations

import math
import random

__all__ = ["LatencyReservoir"]


class LatencyReservoir:
    """Uniform sample (Vitter's algorithm R) of at most ``capacity`` latencies in ns.

    Memory stays bounded however many lookups happen between two snapshots, and every
    lookup has the same chance to be in the sample, so the percentiles are unbiased.
    """

    __slots__ = ("_capacity", "_count", "_rng", "_samples")

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._rng = random.Random(seed)
        self._samples: list[int] = []
        self._count = 0

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def num_seen(self) -> int:
        """Latencies offered since the last :meth:`reset`."""
        return self._count

    def add(self, ns: int) -> None:
        """Offer one latency in nanoseconds."""
        self._count += 1
        if len(self._samples) < self._capacity:
            self._samples.append(ns)
            return
        j = self._rng.randrange(self._count)
        if j < self._capacity:
            self._samples[j] = ns

    def percentile_us(self, q: float) -> float:
        """Nearest-rank ``q`` quantile (0 < q <= 1) in microseconds; 0.0 when empty."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1] / 1000.0

    def reset(self) -> None:
        """Forget every sample."""
        self._samples.clear()
        self._count = 0
