"""Stats objects components return from ``make_stats()``.

A component counts events in plain integers and floats; ``make_stats()`` returns a
snapshot and resets the counters (gauges such as "blocks in use" are not reset). No
component exports metrics by itself: the engine collects the snapshots and publishes them
(Prometheus). Every stats class is a slotted dataclass whose fields are numbers, so a
publisher can walk ``dataclasses.fields`` generically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "EvictionStats",
    "KVPoolStats",
    "LifetimeStats",
    "PrefixCacheStats",
    "SchedulerStats",
    "StatsSource",
    "TierStats",
    "as_flat_dict",
]


@runtime_checkable
class StatsSource(Protocol):
    """Anything that reports stats."""

    def make_stats(self) -> object:
        """Return a stats snapshot and reset the event counters."""
        ...


@dataclass(slots=True)
class KVPoolStats:
    """Snapshot of a KV block pool."""

    num_blocks: int = 0  # gauge: capacity
    num_used_blocks: int = 0  # gauge: blocks with ref_count > 0
    num_free_blocks: int = 0  # gauge
    utilization: float = 0.0  # gauge: used / total
    fragmentation: float = 0.0  # gauge: 1 - longest free run / free blocks (0 = contiguous)
    num_allocations: int = 0  # counter: allocate() calls that succeeded
    num_failed_allocations: int = 0  # counter: allocate() calls that returned None
    num_frees: int = 0  # counter: blocks returned to the free list


@dataclass(slots=True)
class TierStats:
    """Snapshot of one tier of a tiered KV store."""

    tier: str = ""
    num_blocks: int = 0  # gauge
    num_used_blocks: int = 0  # gauge
    num_promotions: int = 0  # counter: blocks moved up into this tier
    num_demotions: int = 0  # counter: blocks moved down out of this tier
    bytes_migrated: int = 0  # counter
    quota_violations: int = 0  # counter


@dataclass(slots=True)
class SchedulerStats:
    """Snapshot of a scheduler."""

    num_waiting: int = 0  # gauge: queue depth
    num_running: int = 0  # gauge
    num_steps: int = 0  # counter
    num_scheduled_tokens: int = 0  # counter
    num_preemptions: int = 0  # counter
    num_rejected: int = 0  # counter: refused by admission control
    num_prefix_hit_tokens: int = 0  # counter: prompt tokens served from a prefix cache
    num_external_tokens: int = 0  # counter: prompt tokens whose KV another instance computed
    num_slo_met: int = 0  # counter: finished requests that met their SLOs
    num_slo_missed: int = 0  # counter


@dataclass(slots=True)
class PrefixCacheStats:
    """Snapshot of a prefix index."""

    num_lookups: int = 0  # counter
    num_hits: int = 0  # counter: lookups with at least one block matched
    num_query_tokens: int = 0  # counter
    num_matched_tokens: int = 0  # counter
    num_evicted_blocks: int = 0  # counter
    num_cached_blocks: int = 0  # gauge
    lookup_p50_us: float = 0.0  # since the previous snapshot
    lookup_p99_us: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up tokens that were cached."""
        return self.num_matched_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


@dataclass(slots=True)
class EvictionStats:
    """Snapshot of an eviction policy."""

    num_inserts: int = 0
    num_accesses: int = 0
    num_evictions: int = 0
    num_entries: int = 0  # gauge


@dataclass(slots=True)
class LifetimeStats:
    """Snapshot of a lifetime predictor."""

    num_observations: int = 0
    num_predictions: int = 0
    bucket_accuracy: float = 0.0  # on observations scored since the previous snapshot


def as_flat_dict(stats: object) -> dict[str, float]:
    """Numeric fields of a stats dataclass (and its numeric properties) as a flat dict."""
    if not dataclasses.is_dataclass(stats):
        raise TypeError(f"{type(stats).__name__} is not a stats dataclass")
    out: dict[str, float] = {}
    for f in dataclasses.fields(stats):
        v = getattr(stats, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f.name] = float(v)
    for name in dir(type(stats)):
        attr = getattr(type(stats), name, None)
        if isinstance(attr, property):
            v = getattr(stats, name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[name] = float(v)
    return out
