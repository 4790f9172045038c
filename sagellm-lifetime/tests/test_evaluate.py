"""Held-out evaluation: the online predictor beats its baselines on the seeded trace."""

from __future__ import annotations

import pytest

from sagellm.core.types import RequestKind
from sagellm.lifetime import (
    LastGapPredictor,
    MostFrequentBucketPredictor,
    OnlineLifetimePredictor,
    TtlBuckets,
)
from sagellm.lifetime.bench import accuracy, format_table, time_predictor
from sagellm.lifetime.evaluate import evaluate
from sagellm.lifetime.trace import KVAccess, TraceConfig, generate_trace

BUCKETS = TtlBuckets((1.0, 10.0, 60.0, 300.0))


def test_scoring_predicts_before_observing() -> None:
    f = {"seconds_since_last_access": -1.0}
    trace = [KVAccess(float(t), "k", RequestKind.CHAT, "t", f) for t in (0, 5, 10, 15, 20)]
    scores = evaluate(
        {"online": OnlineLifetimePredictor, "most_frequent": MostFrequentBucketPredictor},
        trace,
        BUCKETS,
        end=400.0,
        train_fraction=0.4,
        num_segments=2,
    )
    # accesses 2..4 are scored (labels 1, 1, 4); by then every learned gap was 5 s
    online = scores["online"]
    assert [(s.num_scored, s.num_correct) for s in online] == [(2, 2), (1, 0)]
    assert online[0].accuracy == 1.0 and online[1].accuracy == 0.0
    frozen = evaluate(
        {"online": OnlineLifetimePredictor},
        trace,
        BUCKETS,
        end=400.0,
        train_fraction=0.4,
        num_segments=2,
        learn_online=False,
    )
    assert [(s.num_scored, s.num_correct) for s in frozen["online"]] == [(2, 2), (1, 0)]
    with pytest.raises(ValueError, match="train_fraction must be in"):
        evaluate({}, trace, BUCKETS, 400.0, train_fraction=1.0)
    with pytest.raises(ValueError, match="num_segments must be at least 1"):
        evaluate({}, trace, BUCKETS, 400.0, num_segments=0)


def test_beats_baselines_on_a_short_trace() -> None:
    acc = accuracy(TraceConfig(duration_s=600.0, seed=0))
    online, last_gap, frequent = acc["online"][-1], acc["last_gap"][-1], acc["most_frequent"][-1]
    assert online >= 0.68
    assert online >= last_gap + 0.05
    assert online >= frequent + 0.3
    assert all(a >= 0.55 for a in acc["online"][:-1])  # every held-out segment


def test_default_trace_reaches_seventy_percent() -> None:
    acc = accuracy(TraceConfig())
    assert acc["online"][-1] >= 0.70
    assert acc["online_frozen"][-1] >= 0.70  # also without learning after the split
    assert acc["online"][-1] > acc["last_gap"][-1] > acc["most_frequent"][-1]


def test_timing_and_table() -> None:
    trace = generate_trace(TraceConfig(duration_s=60.0))
    t = time_predictor(LastGapPredictor, trace, num_predictions=500)
    assert set(t) == {"observe_us", "predict_us", "predict_p50_us", "predict_p99_us"}
    assert 0 < t["predict_p50_us"] <= t["predict_p99_us"]
    results = {
        "online": {"accuracy": [0.7, 0.7, 0.7, 0.7, 0.7], **t},
        "_trace": {"num_accesses": len(trace)},
    }
    table = format_table(TraceConfig(duration_s=60.0), results)
    assert "| online | 0.700 | 0.700 | 0.700 | 0.700 | 0.700 |" in table
