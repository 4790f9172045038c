"""OnlineLifetimePredictor: labels from gaps, back-off, expiry, stats (exact values)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from sagellm.core.errors import ConfigError
from sagellm.core.types import LifetimePrediction, RequestKind
from sagellm.lifetime import OnlineLifetimePredictor, OnlineLifetimePredictorConfig, kind_index


def feats(kind: RequestKind = RequestKind.CHAT, since: float = 2.0, count: int = 2) -> dict:
    return {
        "prefix_depth": 512.0,
        "access_count": float(count),
        "seconds_since_last_access": since,
        "request_kind": float(kind_index(kind)),
        "tenant_hash": 17.0,
    }


def test_before_any_label_the_prior_is_later_or_never() -> None:
    p = OnlineLifetimePredictor()
    assert p.predict(feats()) == LifetimePrediction(0.5, math.inf, 4)


def test_learns_from_the_gap_to_the_next_access() -> None:
    p = OnlineLifetimePredictor()
    f = feats()
    p.observe("k", f, 0.0)
    p.observe("k", f, 5.0)  # labels the first access: gap 5 s, bucket 1-10s
    assert p.predict(f) == LifetimePrediction(1.0, 5.0, 1)
    stats = p.make_stats()
    assert (stats.num_observations, stats.num_predictions) == (2, 1)
    assert stats.bucket_accuracy == 0.0  # the prior (bucket 4) was scored against bucket 1
    p.observe("k", f, 12.0)  # gap 7 s: now predicted right
    assert p.make_stats().bucket_accuracy == 1.0
    assert p.predict(f).ttl_seconds == pytest.approx((5.0 * 0.995 + 7.0) / (0.995 + 1.0))
    empty = p.make_stats()
    assert (empty.num_observations, empty.num_predictions, empty.bucket_accuracy) == (0, 1, 0.0)


def test_cells_back_off_to_coarser_ones() -> None:
    p = OnlineLifetimePredictor(OnlineLifetimePredictorConfig(min_cell_weight=1.0))
    fa = feats(RequestKind.CHAT, since=2.0)
    fb = feats(RequestKind.ONE_OFF, since=-1.0, count=1)
    p.observe("a", fa, 0.0)
    p.observe("a", fa, 0.5)  # chat access -> bucket 0
    p.observe("b", fb, 1.0)
    p.observe("b", fb, 31.0)  # one-off access -> bucket 2
    assert p.predict(fa) == LifetimePrediction(1.0, 0.5, 0)
    assert p.predict(fb) == LifetimePrediction(1.0, 30.0, 2)
    # a kind never seen uses the global histogram (decayed bucket 0 vs fresh bucket 2)
    assert p.predict(feats(RequestKind.COMPLETION)) == LifetimePrediction(1.0, 30.0, 2)
    # same kind, unseen finer cell: the (kind,) cell answers
    assert p.predict(feats(RequestKind.CHAT, since=100.0, count=50)).ttl_bucket == 0
    assert p.num_cells == 8


def test_idle_keys_are_labelled_later_or_never() -> None:
    p = OnlineLifetimePredictor()
    f = feats()
    p.observe("x", f, 0.0)
    p.observe("y", f, 299.0)
    assert p.num_tracked_keys == 2
    p.observe("y", f, 300.0)  # x idle for 300 s: bucket ">=300s or never"
    assert p.num_tracked_keys == 1
    pred = p.predict(f)
    assert (pred.ttl_bucket, pred.ttl_seconds) == (4, math.inf)
    assert pred.reuse_probability == pytest.approx(0.995 / 1.995)  # 1 s reuse, 1 never


def test_tracked_keys_are_bounded() -> None:
    p = OnlineLifetimePredictor(OnlineLifetimePredictorConfig(max_tracked_keys=2))
    f = feats()
    for i, key in enumerate("abc"):
        p.observe(key, f, float(i))
    assert p.num_tracked_keys == 2
    p.observe("a", f, 3.0)  # "a" was forgotten: no label
    assert p.predict(f) == LifetimePrediction(0.5, math.inf, 4)
    p.observe("c", f, 4.0)  # "c" is remembered: gap 2 s
    assert p.predict(f).ttl_bucket == 1


def test_bad_input() -> None:
    p = OnlineLifetimePredictor()
    with pytest.raises(ValueError, match="now must be a finite time in seconds, got inf"):
        p.observe("k", feats(), math.inf)
    with pytest.raises(ConfigError, match="takes an OnlineLifetimePredictorConfig"):
        OnlineLifetimePredictor(object())  # type: ignore[arg-type]
    p.observe("k", feats(), 10.0)
    p.observe("k", feats(), 9.0)  # a clock that steps back counts as a zero gap
    assert p.predict(feats()).ttl_bucket == 0


def test_missing_features_default_to_zero() -> None:
    p = OnlineLifetimePredictor(OnlineLifetimePredictorConfig(min_cell_weight=1.0))
    p.observe("k", {}, 0.0)
    p.observe("k", {}, 20.0)
    assert p.predict({}) == LifetimePrediction(1.0, 20.0, 2)


ops = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.floats(0.0, 400.0),
        st.integers(0, 3),
        st.floats(-1.0, 500.0),
        st.integers(1, 300),
    ),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(ops=ops, min_weight=st.sampled_from([0.0, 1.0, 4.0]))
def test_predictions_are_always_consistent(ops: list, min_weight: float) -> None:
    p = OnlineLifetimePredictor(
        OnlineLifetimePredictorConfig(min_cell_weight=min_weight, max_tracked_keys=3)
    )
    now = 0.0
    for key, step, kind, since, count in ops:
        now += step
        f = {
            "prefix_depth": 64.0,
            "access_count": float(count),
            "seconds_since_last_access": since,
            "request_kind": float(kind),
            "tenant_hash": 3.0,
        }
        p.observe(key, f, now)
        pred = p.predict(f)
        assert 0.0 <= pred.reuse_probability <= 1.0
        assert pred.ttl_seconds >= 0.0
        assert p.buckets.bucket(pred.ttl_seconds) == pred.ttl_bucket
        assert p.num_tracked_keys <= 3
    stats = p.make_stats()
    assert 0.0 <= stats.bucket_accuracy <= 1.0
    assert stats.num_observations == len(ops)
