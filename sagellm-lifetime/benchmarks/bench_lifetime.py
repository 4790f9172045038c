"""asv benchmarks: predict/observe cost and held-out TTL-bucket accuracy.

The online predictor and its baselines (last gap, most frequent bucket) run side by side
on the same seeded trace (``sagellm.lifetime.bench``: 30 simulated minutes at 6
requests/s). ``track_*`` report accuracy on the held-out half and the gain over each
baseline; ``time_*`` time batches of 1,000 predictions and observations.
"""

from __future__ import annotations

from typing import Any

from sagellm.lifetime.bench import PREDICTORS, accuracy
from sagellm.lifetime.trace import TraceConfig, generate_trace

_MEMO: dict[str, Any] = {}


def _trace() -> list[Any]:
    if "trace" not in _MEMO:
        _MEMO["trace"] = generate_trace(TraceConfig())
    trace: list[Any] = _MEMO["trace"]
    return trace


def _trained(name: str, split: int) -> Any:
    predictor = PREDICTORS[name]()
    for a in _trace()[:split]:
        predictor.observe(a.key, a.features, a.time)
    return predictor


class PredictorSpeed:
    """1,000 predict calls on a predictor trained on all but the last 6,000 accesses."""

    params = list(PREDICTORS)
    param_names = ["predictor"]
    timeout = 120

    def setup(self, name: str) -> None:
        trace = _trace()
        split = len(trace) - 6000
        self.predictor = _trained(name, split)
        self.features = [a.features for a in trace[split : split + 1000]]

    def time_predict_1000(self, name: str) -> None:
        predict = self.predictor.predict
        for f in self.features:
            predict(f)


class ObserveSpeed:
    """1,000 observe calls, each batch the next accesses of the trace (time moves on)."""

    params = list(PREDICTORS)
    param_names = ["predictor"]
    timeout = 120
    number = 1
    repeat = 5
    warmup_time = 0.0

    def setup(self, name: str) -> None:
        trace = _trace()
        split = len(trace) - 6000
        self.predictor = _trained(name, split)
        self.batches = [trace[split + 1000 * i : split + 1000 * (i + 1)] for i in range(6)]
        self.calls = 0

    def time_observe_1000(self, name: str) -> None:
        batch = self.batches[min(self.calls, len(self.batches) - 1)]
        self.calls += 1
        observe = self.predictor.observe
        for a in batch:
            observe(a.key, a.features, a.time)


class PredictorAccuracy:
    """TTL-bucket accuracy on the held-out half of the trace (one evaluation pass)."""

    params = list(PREDICTORS)
    param_names = ["predictor"]
    timeout = 120

    def setup_cache(self) -> dict[str, list[float]]:
        return accuracy(TraceConfig())

    def track_accuracy(self, acc: dict[str, list[float]], name: str) -> float:
        return acc[name][-1]

    track_accuracy.unit = "fraction"  # type: ignore[attr-defined]

    def track_gain_over_last_gap(self, acc: dict[str, list[float]], name: str) -> float:
        return acc[name][-1] - acc["last_gap"][-1]

    track_gain_over_last_gap.unit = "fraction"  # type: ignore[attr-defined]

    def track_gain_over_most_frequent(self, acc: dict[str, list[float]], name: str) -> float:
        return acc[name][-1] - acc["most_frequent"][-1]

    track_gain_over_most_frequent.unit = "fraction"  # type: ignore[attr-defined]

    def track_worst_segment_accuracy(self, acc: dict[str, list[float]], name: str) -> float:
        return min(acc[name][:-1])

    track_worst_segment_accuracy.unit = "fraction"  # type: ignore[attr-defined]


class FrozenAccuracy:
    """The online predictor frozen at the split: no learning on the held-out half."""

    timeout = 120

    def setup_cache(self) -> dict[str, list[float]]:
        return accuracy(TraceConfig())

    def track_online_frozen_accuracy(self, acc: dict[str, list[float]]) -> float:
        return acc["online_frozen"][-1]

    track_online_frozen_accuracy.unit = "fraction"  # type: ignore[attr-defined]
