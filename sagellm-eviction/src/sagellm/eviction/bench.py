"""Decision latency and miss-ratio curves of every policy on the LLM KV trace.

``python -m sagellm.eviction.bench`` builds the default LLM KV trace
(:class:`~sagellm.eviction.config.KVTraceConfig`), then

1. replays it with the get loop at 5% of its distinct keys and times every policy call
   (``insert``, ``access``, ``evict``) with ``perf_counter_ns``, next to a plain
   ``OrderedDict`` LRU with the same interface (the baseline), in the same run;
   prints mean and p99 nanoseconds per call and the ratio to the baseline;
2. prints the miss ratio of every policy at several cache sizes (fractions of the
   distinct keys) and, per size, the best policy's hit ratio relative to LRU's.

``cost_aware`` runs with the trace's features and cost 1 per block; when a lifetime
predictor is installed (entry-point group ``sagellm.lifetime``) it also runs as
``cost_aware+predictor`` with the first one found, a fresh instance per replay.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.core.types import EvictionDecision, PolicyContext
from sagellm.eviction.compare import ALGORITHMS
from sagellm.eviction.config import KVTraceConfig
from sagellm.eviction.cost_aware import CostAwarePolicy
from sagellm.eviction.simulate import simulate
from sagellm.eviction.trace import KVTrace, kv_trace

__all__ = [
    "BASELINE",
    "LatencyResult",
    "OrderedDictLRU",
    "best_vs_lru",
    "main",
    "make_policy",
    "measure_latency",
    "miss_ratio_curves",
]

BASELINE = "ordereddict_lru"
POLICY_NAMES = ("lru", "fifo", "lfu", "arc", "s3fifo", "sieve", "cost_aware")
CURVE_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)


class OrderedDictLRU:
    """The baseline: the textbook LRU, an OrderedDict and nothing else (no pins, no checks)."""

    name = BASELINE

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(
        self,
        key: Hashable,
        *,
        cost: float = 1.0,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        self._order[key] = None

    def access(
        self,
        key: Hashable,
        *,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        self._order.move_to_end(key)

    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        order = self._order
        return EvictionDecision(
            victims=tuple(order.popitem(last=False)[0] for _ in range(min(num, len(order))))
        )

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)


def _lifetime_predictor() -> Any:
    """A factory of the first installed lifetime predictor, through the registry (None if
    none). Every replay gets a fresh predictor: one learned on an earlier replay would
    carry its state (and times) into the next."""
    try:
        from sagellm.core import registry

        names = [info.name for info in registry.available("lifetime")]
        if not names:
            return None
        registry.load("lifetime", names[0])  # fails here, not in the middle of the bench
        return lambda: registry.load("lifetime", names[0])
    except Exception:  # noqa: BLE001 - an optional peer; the bench runs without it
        return None


def make_policy(name: str, capacity: int, predictor: Any = None) -> Any:
    """A fresh policy (or the baseline) for ``capacity`` keys; ``predictor`` is a
    LifetimePredictor or a no-argument factory of one (called here)."""
    if name == BASELINE:
        return OrderedDictLRU()
    if name == "cost_aware":
        return CostAwarePolicy(capacity=capacity)
    if name == "cost_aware+predictor":
        if callable(predictor) and not hasattr(predictor, "predict"):
            predictor = predictor()
        return CostAwarePolicy(capacity=capacity, predictor=predictor)
    return ALGORITHMS[name](capacity=capacity)


@dataclass(frozen=True, slots=True)
class LatencyResult:
    policy: str
    num_calls: int
    mean_ns: float
    p99_ns: float


def measure_latency(
    name: str,
    trace: KVTrace,
    capacity: int,
    features: Sequence[Mapping[str, float]] | None = None,
    predictor: Any = None,
    limit: int | None = None,
) -> LatencyResult:
    """Time every policy call of the get loop (the membership test is not a decision)."""
    policy = make_policy(name, capacity, predictor)
    keys, times = trace.keys, trace.times
    n = len(keys) if limit is None else min(limit, len(keys))
    samples: list[int] = []
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(n):
            key = keys[i]
            feats = None if features is None else features[i]
            now = times[i]
            if key in policy:
                t0 = clock()
                policy.access(key, now=now, features=feats)
                samples.append(clock() - t0)
            else:
                if len(policy) >= capacity:
                    t0 = clock()
                    policy.evict(1)
                    samples.append(clock() - t0)
                t0 = clock()
                policy.insert(key, now=now, features=feats)
                samples.append(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    samples.sort()
    mean = sum(samples) / len(samples)
    p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
    return LatencyResult(name, len(samples), mean, float(p99))


def miss_ratio_curves(
    trace: KVTrace,
    names: Sequence[str],
    fractions: Sequence[float] = CURVE_FRACTIONS,
    predictor: Any = None,
) -> dict[str, dict[int, float]]:
    """Miss ratio per policy per cache size (keys)."""
    distinct = trace.num_distinct
    sizes = sorted({max(1, int(distinct * f)) for f in fractions})
    features = trace.features()
    out: dict[str, dict[int, float]] = {}
    for name in names:
        out[name] = {}
        for size in sizes:
            policy = make_policy(name, size, predictor)
            feats = features if name.startswith("cost_aware") else None
            out[name][size] = simulate(
                policy, trace.keys, size, times=trace.times, features=feats
            ).miss_ratio
    return out


def best_vs_lru(curves: dict[str, dict[int, float]]) -> dict[int, tuple[str, float, float]]:
    """Per size: (best policy, its hit ratio, relative hit-ratio gain over LRU)."""
    out = {}
    for size, lru_miss in curves["lru"].items():
        best = min(curves, key=lambda n: curves[n][size])
        lru_hit, best_hit = 1.0 - lru_miss, 1.0 - curves[best][size]
        out[size] = (best, best_hit, best_hit / lru_hit - 1.0 if lru_hit > 0 else 0.0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sagellm.eviction.bench",
        description="Decision latency and miss-ratio curves on the LLM KV trace.",
    )
    parser.add_argument("--quick", action="store_true", help="a 2-minute trace (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = KVTraceConfig(seed=args.seed, duration_seconds=120.0 if args.quick else 600.0)
    start = time.perf_counter()
    trace = kv_trace(config)
    print(
        f"# LLM KV trace (seed {config.seed}, {config.duration_seconds:.0f} s): {len(trace)} "
        f"block accesses, {trace.num_distinct} distinct blocks, {trace.num_requests} requests"
    )
    predictor = _lifetime_predictor()
    names = list(POLICY_NAMES)
    if predictor is not None:
        names.append("cost_aware+predictor")

    capacity = max(1, int(trace.num_distinct * 0.05))
    features = trace.features()
    print(f"\n## decision latency per call (get loop at {capacity} keys = 5% of distinct)")
    print(
        f"{'policy':<22} {'calls':>8} {'mean ns':>9} {'p99 ns':>9} {'mean/base':>10} {'p99/base':>9}"
    )
    base = measure_latency(BASELINE, trace, capacity)
    rows = [base]
    for name in names:
        feats = features if name.startswith("cost_aware") else None
        rows.append(measure_latency(name, trace, capacity, feats, predictor))
    for r in rows:
        print(
            f"{r.policy:<22} {r.num_calls:>8} {r.mean_ns:>9.0f} {r.p99_ns:>9.0f} "
            f"{r.mean_ns / base.mean_ns:>10.2f} {r.p99_ns / base.p99_ns:>9.2f}"
        )

    print("\n## miss ratio per cache size (keys; fraction of distinct blocks)")
    curves = miss_ratio_curves(trace, names, predictor=predictor)
    sizes = list(curves["lru"])
    print(f"{'policy':<22}" + "".join(f"{s:>9}" for s in sizes))
    for name, curve in curves.items():
        print(f"{name:<22}" + "".join(f"{curve[s]:>9.4f}" for s in sizes))
    print("\n## best policy's hit ratio vs LRU's")
    print(f"{'size':>7} {'best':<22} {'hit':>7} {'lru hit':>8} {'gain':>8}")
    for size, (best, hit, gain) in best_vs_lru(curves).items():
        lru_hit = 1.0 - curves["lru"][size]
        print(f"{size:>7} {best:<22} {hit:>7.4f} {lru_hit:>8.4f} {gain:>+8.1%}")
    print(f"\n# {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
