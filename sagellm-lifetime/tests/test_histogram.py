"""Lazy decay of HistogramCell against eager decay, and the inlined learning path."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from sagellm.core.types import LifetimePrediction, RequestKind
from sagellm.lifetime import OnlineLifetimePredictor, OnlineLifetimePredictorConfig, kind_index
from sagellm.lifetime.predictor import GapLearner, HistogramCell
from sagellm.lifetime.trace import TraceConfig, generate_trace

NUM_BUCKETS = 5
EDGES = (1.0, 10.0, 60.0, 300.0)


class EagerCell:
    """Reference: multiply every count and gap sum by ``decay`` at each label."""

    def __init__(self) -> None:
        self.counts = [0.0] * NUM_BUCKETS
        self.gap_sums = [0.0] * NUM_BUCKETS

    def add(self, bucket: int, gap: float, decay: float) -> None:
        self.counts = [c * decay for c in self.counts]
        self.gap_sums = [s * decay for s in self.gap_sums]
        self.counts[bucket] += 1.0
        if math.isfinite(gap):
            self.gap_sums[bucket] += gap

    @property
    def best(self) -> int:
        return max(range(NUM_BUCKETS), key=self.counts.__getitem__)


def bucket_of(gap: float) -> int:
    return sum(gap >= e for e in EDGES)


gaps = st.one_of(st.floats(0.0, 600.0), st.just(math.inf))


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(gaps, min_size=1, max_size=120))
def test_lazy_decay_is_exact_when_decay_is_a_power_of_two(labels: list[float]) -> None:
    # with decay 1/2 every stored number is a sum of powers of two: no rounding at all
    lazy, eager = HistogramCell(NUM_BUCKETS, 0.5), EagerCell()
    for gap in labels:
        lazy.add(bucket_of(gap), gap, 0.5)
        eager.add(bucket_of(gap), gap, 0.5)
        assert lazy.decayed_counts() == eager.counts
        assert lazy.weight == sum(eager.counts)
        assert lazy.best == eager.best
        for b in range(NUM_BUCKETS - 1):
            if eager.counts[b] > 0.0:
                mean = eager.gap_sums[b] / eager.counts[b]
                assert lazy.mean_gaps[b] == pytest.approx(mean, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(
        st.tuples(st.integers(0, NUM_BUCKETS - 1), st.floats(0.0, 600.0)), min_size=1, max_size=200
    ),
    decay=st.sampled_from([1.0, 0.995, 0.9, 0.3]),
)
def test_lazy_decay_matches_eager_decay(labels: list[tuple[int, float]], decay: float) -> None:
    lazy, eager = HistogramCell(NUM_BUCKETS, decay), EagerCell()
    for bucket, gap in labels:
        lazy.add(bucket, gap, decay)
        eager.add(bucket, gap, decay)
    assert lazy.decayed_counts() == pytest.approx(eager.counts, rel=1e-12, abs=1e-300)
    assert lazy.weight == pytest.approx(sum(eager.counts), rel=1e-12)
    top = max(eager.counts)
    assert eager.counts[lazy.best] == pytest.approx(top, rel=1e-12)


def test_a_long_history_rescales_and_stays_finite() -> None:
    # 1/0.3 ** 200 passes 1e100: the cell rescales its stored counts on the way
    lazy, eager = HistogramCell(NUM_BUCKETS, 0.3), EagerCell()
    for i in range(1000):
        gap = (0.5, 5.0, 30.0)[i % 3] if i % 7 else math.inf
        lazy.add(bucket_of(gap), gap, 0.3)
        eager.add(bucket_of(gap), gap, 0.3)
        assert lazy.unit <= 1e100
    assert lazy.decayed_counts() == pytest.approx(eager.counts, rel=1e-9)
    assert lazy.best == eager.best
    assert lazy.weight == pytest.approx(1 / 0.7)


def test_a_tiny_decay_keeps_only_the_latest_label() -> None:
    cell = HistogramCell(NUM_BUCKETS, 1e-300)
    for gap in (5.0, 0.5, 30.0, math.inf, 2.0):
        cell.add(bucket_of(gap), gap, 1e-300)
        assert all(math.isfinite(c) for c in cell.counts)
    assert (cell.best, cell.mean_gaps[1], cell.weight) == (1, 2.0, 1.0)


def feats(kind: RequestKind, since: float = 2.0) -> dict[str, float]:
    return {
        "prefix_depth": 512.0,
        "access_count": 2.0,
        "seconds_since_last_access": since,
        "request_kind": float(kind_index(kind)),
        "tenant_hash": 17.0,
    }


def test_exact_predictions_with_decay_one_half() -> None:
    p = OnlineLifetimePredictor(OnlineLifetimePredictorConfig(decay=0.5, min_cell_weight=1.0))
    f = feats(RequestKind.CHAT)
    for now in (0.0, 5.0, 5.5):  # gaps 5, 0.5: counts 1/2 and 1 of buckets 1 and 0
        p.observe("k", f, now)
    assert p.predict(f) == LifetimePrediction(1.0, 0.5, 0)
    p.observe("k", f, 12.5)  # gap 7: counts 1/2 and 1/4 + 1 of buckets 0 and 1
    assert p.predict(f) == LifetimePrediction(1.0, pytest.approx(8.25 / 1.25), 1)
    p.observe("other", f, 400.0)  # "k" idle for 300 s: counts 1/4, 5/8 and 1 "never"
    assert p.predict(f) == LifetimePrediction(0.875 / 1.875, math.inf, 4)
    p.observe(
        "other", f, 401.0
    )  # gap 1 s: counts 1/8, 5/16 + 1, 1/2; gaps 5, 7, 1 weigh 1/16, 1/4, 1
    assert p.predict(f) == LifetimePrediction(1.4375 / 1.9375, pytest.approx(3.0625 / 1.3125), 1)
    stats = p.make_stats()
    # each label scored before learning it: bucket 4 (the prior) vs 1, 1 vs 0, 0 vs 1,
    # 1 vs 4 ("never"), 4 vs 1
    assert (stats.num_observations, stats.bucket_accuracy) == (6, 0.0)


def test_cells_of_unlabelled_accesses_are_never_trusted() -> None:
    p = OnlineLifetimePredictor(OnlineLifetimePredictorConfig(min_cell_weight=0.0))
    fa, fb = feats(RequestKind.CHAT), feats(RequestKind.ONE_OFF)
    p.observe("a", fa, 0.0)  # makes the cells of fa, without a label
    assert p.predict(fa) == LifetimePrediction(0.5, math.inf, 4)
    p.observe("b", fb, 1.0)
    p.observe("b", fb, 3.0)  # one label, 2 s, in the cells of fb and the global one
    assert p.predict(fa) == LifetimePrediction(1.0, 2.0, 1)
    assert p.num_cells == 4


class ReferenceLearning(OnlineLifetimePredictor):
    """The predictor through the generic hooks (_predict_encoded, _learn -> add)."""

    _label = GapLearner._label


def test_inlined_learning_equals_the_generic_hooks() -> None:
    trace = generate_trace(TraceConfig(duration_s=400.0, seed=3))
    config = OnlineLifetimePredictorConfig(decay=0.9)
    fast, reference = OnlineLifetimePredictor(config), ReferenceLearning(config)
    for a in trace:
        assert fast.predict(a.features) == reference.predict(a.features)
        fast.observe(a.key, a.features, a.time)
        reference.observe(a.key, a.features, a.time)
    assert fast.make_stats() == reference.make_stats()
    assert fast.num_cells == reference.num_cells > 0
