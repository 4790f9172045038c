"""Accuracy of predictors on held-out segments of a trace, side by side.

Every predictor sees the same accesses in time order through ``observe``. The first
``train_fraction`` of the trace only trains; after that, each access is first predicted
from its features and scored against its true label (the bucket of the gap to the same
key's next access, which no predictor has seen yet), then observed. The scored part is
cut into ``num_segments`` equal segments, each reported separately. With
``learn_online=False`` the predictors stop observing after the training part (a model
frozen at the split, the strictest hold-out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sagellm.lifetime.buckets import TtlBuckets
from sagellm.lifetime.trace import KVAccess, label_trace

__all__ = ["SegmentScore", "evaluate"]


@dataclass(frozen=True, slots=True)
class SegmentScore:
    """Bucket accuracy of one predictor on one held-out segment."""

    segment: int
    num_scored: int
    num_correct: int

    @property
    def accuracy(self) -> float:
        """Fraction of scored accesses whose bucket was predicted right."""
        return self.num_correct / self.num_scored if self.num_scored else 0.0


def evaluate(
    factories: dict[str, Callable[[], Any]],
    trace: Sequence[KVAccess],
    buckets: TtlBuckets,
    end: float,
    train_fraction: float = 0.5,
    num_segments: int = 4,
    learn_online: bool = True,
) -> dict[str, list[SegmentScore]]:
    """Per predictor name, its score on each held-out segment (see the module docstring)."""
    if not 0.0 <= train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in [0, 1), got {train_fraction}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be at least 1, got {num_segments}")
    labels = label_trace(list(trace), buckets, end)
    first = int(len(trace) * train_fraction)
    seg_len = max(1, -(-(len(trace) - first) // num_segments))
    out: dict[str, list[SegmentScore]] = {}
    for name, factory in factories.items():
        predictor = factory()
        scored = [0] * num_segments
        correct = [0] * num_segments
        for i, a in enumerate(trace):
            label = labels[i]
            if i >= first and label is not None:
                seg = min((i - first) // seg_len, num_segments - 1)
                scored[seg] += 1
                if predictor.predict(a.features).ttl_bucket == label:
                    correct[seg] += 1
            if learn_online or i < first:
                predictor.observe(a.key, a.features, a.time)
        out[name] = [SegmentScore(s, scored[s], correct[s]) for s in range(num_segments)]
    return out
