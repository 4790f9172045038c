"""Baselines the online predictor is compared with, learned from the same labels."""

from __future__ import annotations

import math
from collections.abc import Mapping

from sagellm.core.types import LifetimePrediction
from sagellm.lifetime.config import OnlineLifetimePredictorConfig
from sagellm.lifetime.predictor import GapLearner

__all__ = ["LastGapPredictor", "MostFrequentBucketPredictor"]


class MostFrequentBucketPredictor(GapLearner):
    """Always the bucket seen most often so far, whatever the features."""

    def __init__(self, config: OnlineLifetimePredictorConfig | None = None) -> None:
        super().__init__(config)
        self._counts = [0] * self.buckets.num_buckets
        self._horizon_buckets = self.buckets.bucket(self.config.horizon_seconds)
        self._current = LifetimePrediction(0.5, math.inf, self.buckets.num_buckets - 1)

    def _encode(self, features: Mapping[str, float]) -> object:
        return None

    def _predict_encoded(self, encoded: object) -> LifetimePrediction:
        return self._current

    def _learn(self, encoded: object, bucket: int, gap: float) -> None:
        self._counts[bucket] += 1
        best = max(range(len(self._counts)), key=self._counts.__getitem__)
        total = sum(self._counts)
        reuse = sum(self._counts[: self._horizon_buckets]) / total
        self._current = LifetimePrediction(reuse, self.buckets.midpoint(best), best)


class LastGapPredictor(MostFrequentBucketPredictor):
    """The next gap equals the previous one (``seconds_since_last_access``).

    A first access (no previous gap) gets the most frequent bucket.
    """

    def _encode(self, features: Mapping[str, float]) -> object:
        return features.get("seconds_since_last_access", -1.0)

    def _predict_encoded(self, encoded: object) -> LifetimePrediction:
        since = float(encoded)  # type: ignore[arg-type]
        if since < 0:
            return self._current
        bucket = self.buckets.bucket(since)
        reuse = 1.0 if bucket < self._horizon_buckets else 0.0
        return LifetimePrediction(reuse, since, bucket)
