"""Conformance suite of :class:`sagellm.core.protocols.LifetimePredictor`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from hypothesis import given
from hypothesis import strategies as st

from sagellm.core.protocols import LifetimePredictor
from sagellm.core.telemetry import LifetimeStats
from sagellm.core.testing._common import suite_settings
from sagellm.core.types import LifetimePrediction

__all__ = ["LifetimePredictorConformance"]

#: Feature names the engine passes to predictors.
_FEATURE_NAMES = (
    "prefix_depth",
    "access_count",
    "seconds_since_last_access",
    "request_kind",
    "tenant_hash",
)

_features = st.dictionaries(
    st.sampled_from(_FEATURE_NAMES),
    st.floats(min_value=-1.0, max_value=1e6, allow_nan=False),
)


def _check(p: object) -> LifetimePrediction:
    assert isinstance(p, LifetimePrediction)
    assert 0.0 <= p.reuse_probability <= 1.0, p
    assert not math.isnan(p.ttl_seconds) and p.ttl_seconds >= 0.0, p
    assert isinstance(p.ttl_bucket, int) and p.ttl_bucket >= 0, p
    return p


class LifetimePredictorConformance:
    """Behaviour every lifetime predictor shares. Implement :meth:`make_predictor`.

    Features are the flat number mappings the engine passes (``prefix_depth``,
    ``access_count``, ``seconds_since_last_access``, ``request_kind``, ``tenant_hash``);
    a predictor accepts missing and unknown names. ``now`` never decreases.
    """

    #: Hypothesis examples of the property tests.
    max_examples: ClassVar[int] = 30

    def make_predictor(self) -> Any:
        """A fresh predictor (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_predictor()")

    def test_is_lifetime_predictor(self) -> None:
        predictor = self.make_predictor()
        assert isinstance(predictor, LifetimePredictor)

    def test_untrained_prediction_is_valid(self) -> None:
        predictor = self.make_predictor()
        _check(predictor.predict({}))
        _check(predictor.predict({"prefix_depth": 64.0, "access_count": 1.0}))
        _check(predictor.predict({"an_unknown_feature": 3.0}))

    def test_prediction_is_deterministic_for_the_same_state(self) -> None:
        predictor = self.make_predictor()
        for i in range(40):
            features = {"prefix_depth": float(16 * (i % 4)), "access_count": float(i // 4)}
            predictor.observe(i % 5, features, now=float(i))
        probe = {"prefix_depth": 16.0, "access_count": 2.0, "seconds_since_last_access": 1.0}
        assert predictor.predict(probe) == predictor.predict(probe)

    def test_observe_learns_without_error(self) -> None:
        predictor = self.make_predictor()
        for i in range(200):
            key = i % 7
            predictor.observe(
                key, {"prefix_depth": float(key), "access_count": float(i)}, now=i * 0.5
            )
        _check(predictor.predict({"prefix_depth": 3.0, "access_count": 10.0}))

    def test_random_histories_give_valid_predictions(self) -> None:
        @suite_settings(self.max_examples)
        @given(
            history=st.lists(
                st.tuples(st.integers(0, 5), _features, st.floats(0.0, 50.0)), max_size=40
            ),
            probes=st.lists(_features, min_size=1, max_size=5),
        )
        def check(
            history: list[tuple[int, Mapping[str, float], float]],
            probes: list[Mapping[str, float]],
        ) -> None:
            predictor = self.make_predictor()
            now = 0.0
            for key, features, gap in history:
                now += gap
                predictor.observe(key, features, now=now)
            for features in probes:
                p = _check(predictor.predict(features))
                assert predictor.predict(features) == p

        check()

    def test_make_stats_reports_and_resets_counters(self) -> None:
        predictor = self.make_predictor()
        for i in range(6):
            predictor.observe(i % 2, {"access_count": float(i)}, now=float(i))
        predictor.predict({})
        stats = predictor.make_stats()
        assert isinstance(stats, LifetimeStats)
        assert (stats.num_observations, stats.num_predictions) == (6, 1)
        assert 0.0 <= stats.bucket_accuracy <= 1.0
        again = predictor.make_stats()
        assert (again.num_observations, again.num_predictions) == (0, 0)
