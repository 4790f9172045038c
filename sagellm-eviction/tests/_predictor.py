"""A test double of LifetimePredictor: reuse read from a feature, calls recorded."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sagellm.core.telemetry import LifetimeStats
from sagellm.core.types import LifetimePrediction


class FakePredictorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FakePredictor:
    """``reuse_probability`` = ``tenant_hash / 10`` (0.5 when absent), ``ttl_seconds`` = the
    ``ttl_seconds`` feature (1.0 when absent; ``inf`` allowed); records observe calls."""

    config_class: ClassVar[type[BaseModel]] = FakePredictorConfig

    def __init__(self) -> None:
        self.observed: list[tuple[Hashable, dict[str, float], float]] = []
        self.num_predictions = 0

    def observe(self, key: Hashable, features: Mapping[str, float], now: float) -> None:
        self.observed.append((key, dict(features), now))

    def predict(self, features: Mapping[str, float]) -> LifetimePrediction:
        self.num_predictions += 1
        reuse = features.get("tenant_hash", 5.0) / 10.0
        ttl = features.get("ttl_seconds", 1.0)
        return LifetimePrediction(reuse_probability=reuse, ttl_seconds=ttl, ttl_bucket=0)

    def make_stats(self) -> Any:
        stats = LifetimeStats(num_observations=len(self.observed))
        return stats
