"""Drive an eviction policy over a key sequence with libCacheSim's get loop.

The loop, per access: a hit (``key in policy``) is an :meth:`access`; a miss evicts one
key when the cache holds ``capacity`` keys, then inserts. The membership test comes
first on purpose: it is the lookup that lets ARC and S3-FIFO see a ghost hit before they
choose the victim, as libCacheSim's ``find`` does.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SimulationResult", "simulate"]


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """Outcome of one policy over one trace at one capacity."""

    policy: str  # entry-point name (or class name)
    capacity: int  # keys the cache held at most
    num_requests: int  # accesses replayed
    num_hits: int  # accesses that found their key

    @property
    def num_misses(self) -> int:
        return self.num_requests - self.num_hits

    @property
    def hit_ratio(self) -> float:
        return self.num_hits / self.num_requests if self.num_requests else 0.0

    @property
    def miss_ratio(self) -> float:
        """Object miss ratio (every key has size 1)."""
        return 1.0 - self.hit_ratio if self.num_requests else 0.0


def simulate(
    policy: Any,
    keys: Sequence[Hashable],
    capacity: int,
    *,
    times: Sequence[float] | None = None,
    features: Sequence[Mapping[str, float] | None] | None = None,
) -> SimulationResult:
    """Replay ``keys`` through ``policy`` (an EvictionPolicy) in a cache of ``capacity`` keys.

    ``times`` (default: the access index) are passed as ``now``; ``features`` (one
    mapping or None per access) as ``features``. Every key costs 1.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 key, got {capacity}")
    if times is not None and len(times) != len(keys):
        raise ValueError(f"times has {len(times)} entries for {len(keys)} keys")
    if features is not None and len(features) != len(keys):
        raise ValueError(f"features has {len(features)} entries for {len(keys)} keys")
    hits = 0
    access, insert, evict = policy.access, policy.insert, policy.evict
    for i, key in enumerate(keys):
        now = float(i) if times is None else times[i]
        feats = None if features is None else features[i]
        if key in policy:
            hits += 1
            access(key, now=now, features=feats)
        else:
            if len(policy) >= capacity:
                evict(1)
            insert(key, now=now, features=feats)
    name = getattr(policy, "name", type(policy).__name__)
    return SimulationResult(policy=name, capacity=capacity, num_requests=len(keys), num_hits=hits)
