"""asv benchmarks of sagellm.eviction on a seeded 2-minute LLM KV trace.

``DecisionLatency`` times a get-loop replay per policy next to the plain OrderedDict LRU
baseline and tracks mean/p99 nanoseconds per call and their ratios to the baseline (same
process, same trace). ``MissRatio`` tracks miss ratios per policy and cache size,
``BestVsLRU`` the best policy's relative hit-ratio gain over LRU, ``LibCacheSimAgreement``
the largest ``|ours - libCacheSim|`` miss-ratio difference of ``compare --quick``.
"""

from __future__ import annotations

from typing import Any

from sagellm.eviction.bench import (
    BASELINE,
    POLICY_NAMES,
    best_vs_lru,
    make_policy,
    measure_latency,
    miss_ratio_curves,
)
from sagellm.eviction.config import KVTraceConfig
from sagellm.eviction.simulate import simulate
from sagellm.eviction.trace import KVTrace, kv_trace

_MEMO: dict[str, Any] = {}
FRACTIONS = (0.02, 0.05, 0.2)


def _trace() -> KVTrace:
    if "trace" not in _MEMO:
        _MEMO["trace"] = kv_trace(KVTraceConfig(duration_seconds=120.0, seed=0))
    trace: KVTrace = _MEMO["trace"]
    return trace


def _capacity() -> int:
    return max(1, int(_trace().num_distinct * 0.05))


class DecisionLatency:
    """Replay of 5,000 trace accesses (get loop at 5% of distinct keys) per policy."""

    params = [BASELINE, *POLICY_NAMES]
    param_names = ["policy"]
    timeout = 120
    number = 1
    repeat = 5
    warmup_time = 0.0

    def setup(self, name: str) -> None:
        trace = _trace()
        self.keys = trace.keys[:5000]
        self.times = trace.times[:5000]
        self.features = trace.features()[:5000] if name == "cost_aware" else None
        self.policy = make_policy(name, _capacity())

    def time_replay_5000(self, name: str) -> None:
        simulate(self.policy, self.keys, _capacity(), times=self.times, features=self.features)

    def track_mean_ns_per_call(self, name: str) -> float:
        feats = _trace().features() if name == "cost_aware" else None
        return measure_latency(name, _trace(), _capacity(), feats, limit=5000).mean_ns

    track_mean_ns_per_call.unit = "ns"  # type: ignore[attr-defined]

    def track_mean_ratio_to_ordereddict_lru(self, name: str) -> float:
        feats = _trace().features() if name == "cost_aware" else None
        base = measure_latency(BASELINE, _trace(), _capacity(), limit=5000)
        ours = measure_latency(name, _trace(), _capacity(), feats, limit=5000)
        return ours.mean_ns / base.mean_ns

    track_mean_ratio_to_ordereddict_lru.unit = "ratio"  # type: ignore[attr-defined]

    def track_p99_ratio_to_ordereddict_lru(self, name: str) -> float:
        feats = _trace().features() if name == "cost_aware" else None
        base = measure_latency(BASELINE, _trace(), _capacity(), limit=5000)
        ours = measure_latency(name, _trace(), _capacity(), feats, limit=5000)
        return ours.p99_ns / base.p99_ns

    track_p99_ratio_to_ordereddict_lru.unit = "ratio"  # type: ignore[attr-defined]


class MissRatio:
    """Miss ratio of each policy on the trace at 2%, 5% and 20% of its distinct keys."""

    params = [list(POLICY_NAMES), list(FRACTIONS)]
    param_names = ["policy", "fraction"]
    timeout = 120

    def setup_cache(self) -> dict[str, dict[float, float]]:
        trace = _trace()
        curves = miss_ratio_curves(trace, POLICY_NAMES, FRACTIONS)
        sizes = sorted({max(1, int(trace.num_distinct * f)) for f in FRACTIONS})
        return {n: dict(zip(FRACTIONS, (c[s] for s in sizes))) for n, c in curves.items()}

    def track_miss_ratio(self, cache: dict[str, dict[float, float]], name: str, f: float) -> float:
        return cache[name][f]

    track_miss_ratio.unit = "miss ratio"  # type: ignore[attr-defined]


class BestVsLRU:
    """The best policy's hit ratio over LRU's, minus 1, at 2%, 5% and 20% of distinct keys."""

    params = [list(FRACTIONS)]
    param_names = ["fraction"]
    timeout = 120

    def setup_cache(self) -> dict[float, float]:
        trace = _trace()
        curves = miss_ratio_curves(trace, POLICY_NAMES, FRACTIONS)
        gains = best_vs_lru(curves)
        sizes = sorted(gains)
        return {f: gains[s][2] for f, s in zip(FRACTIONS, sizes)}

    def track_best_hit_ratio_gain_over_lru(self, cache: dict[float, float], f: float) -> float:
        return cache[f]

    track_best_hit_ratio_gain_over_lru.unit = "relative gain"  # type: ignore[attr-defined]


class LibCacheSimAgreement:
    """Largest |ours - libCacheSim| miss ratio over the quick comparison (3 traces x 6 x 4)."""

    timeout = 120

    def setup_cache(self) -> float:
        from sagellm.eviction.compare import compare, standard_traces

        rows = compare(standard_traces(quick=True))
        return max(abs(r.difference) for r in rows)

    def track_max_abs_miss_ratio_difference(self, worst: float) -> float:
        return worst

    track_max_abs_miss_ratio_difference.unit = "miss ratio"  # type: ignore[attr-defined]
