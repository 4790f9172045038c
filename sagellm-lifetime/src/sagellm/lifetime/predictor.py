"""Online TTL-bucket predictor over back-off histograms (registered as ``online``).

Anchor: learned cache replacement (LRB, "learning relaxed Belady"), reduced to the few
features an engine has at an access: prefix depth, access count, time since the previous
access, request kind, tenant. Each access is a training example whose label arrives
later: the gap to the same key's next access, or "later or never" once the key has been
idle longer than the last TTL edge. Labels go into histograms over discretised features
at four levels of detail; a prediction reads the finest cell with enough evidence
(backing off to coarser cells), so new tenants or rare kinds fall back to what is known
about their kind. Cells forget slowly (exponential decay), following drifting traffic.

A prediction is one dict lookup per level plus a cached result, so it costs about a
microsecond in pure Python; learning is O(levels x buckets) per labelled access.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import ClassVar

from pydantic import BaseModel

from sagellm.core.errors import ConfigError
from sagellm.core.telemetry import LifetimeStats
from sagellm.core.types import LifetimePrediction
from sagellm.lifetime.buckets import TtlBuckets
from sagellm.lifetime.config import OnlineLifetimePredictorConfig

__all__ = ["GapLearner", "HistogramCell", "OnlineLifetimePredictor"]

# log-spaced bins of "seconds since last access" (first access: bin -1)
_SINCE_EDGES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
_CellKeys = tuple[tuple[int, ...], ...]


class GapLearner:
    """Turns ``observe`` calls into labelled examples: (features at an access, next gap).

    Subclasses implement :meth:`_encode` (features -> whatever they learn from),
    :meth:`_predict_encoded` and :meth:`_learn`. Keys are remembered in access order; a
    key idle for longer than the last TTL edge is labelled "later or never" and forgotten.
    """

    config_class: ClassVar[type[BaseModel]] = OnlineLifetimePredictorConfig

    def __init__(self, config: OnlineLifetimePredictorConfig | None = None) -> None:
        if config is None:
            config = OnlineLifetimePredictorConfig()
        if not isinstance(config, OnlineLifetimePredictorConfig):
            raise ConfigError(
                f"{type(self).__name__} takes an OnlineLifetimePredictorConfig, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.buckets = TtlBuckets(config.ttl_bucket_edges)
        self._max_gap = config.ttl_bucket_edges[-1]
        self._last: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()
        self._num_observations = 0
        self._num_predictions = 0
        self._num_scored = 0
        self._num_correct = 0

    # subclass hooks ---------------------------------------------------------------

    def _encode(self, features: Mapping[str, float]) -> object:
        raise NotImplementedError

    def _predict_encoded(self, encoded: object) -> LifetimePrediction:
        raise NotImplementedError

    def _learn(self, encoded: object, bucket: int, gap: float) -> None:
        raise NotImplementedError

    # protocol -----------------------------------------------------------------------

    def _label(self, encoded: object, gap: float) -> None:
        bucket = self.buckets.bucket(gap)
        # prequential score: what would have been predicted for that access, before learning
        self._num_scored += 1
        if self._predict_encoded(encoded).ttl_bucket == bucket:
            self._num_correct += 1
        self._learn(encoded, bucket, gap)

    def observe(self, key: Hashable, features: Mapping[str, float], now: float) -> None:
        """Record an access of ``key`` at ``now`` (seconds, non-decreasing across calls).

        Labels the key's previous access with the gap, and every key idle for longer than
        the last TTL edge with "later or never".
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time in seconds, got {now}")
        self._num_observations += 1
        last = self._last
        prev = last.pop(key, None)
        if prev is not None:
            self._label(prev[1], max(0.0, now - prev[0]))
        horizon = now - self._max_gap
        while last:
            oldest_key = next(iter(last))
            t, encoded = last[oldest_key]
            if t > horizon:
                break
            del last[oldest_key]
            self._label(encoded, math.inf)
        if len(last) >= self.config.max_tracked_keys:
            last.popitem(last=False)  # idle, but not long enough to know its label
        last[key] = (now, self._encode(features))

    def predict(self, features: Mapping[str, float]) -> LifetimePrediction:
        """Predicted reuse of an entry whose current features are ``features``."""
        self._num_predictions += 1
        return self._predict_encoded(self._encode(features))

    def make_stats(self) -> LifetimeStats:
        """Counts since the previous snapshot (then reset); accuracy of labelled accesses."""
        stats = LifetimeStats(
            num_observations=self._num_observations,
            num_predictions=self._num_predictions,
            bucket_accuracy=self._num_correct / self._num_scored if self._num_scored else 0.0,
        )
        self._num_observations = self._num_predictions = 0
        self._num_scored = self._num_correct = 0
        return stats

    @property
    def num_tracked_keys(self) -> int:
        """Keys waiting for their next access (or for expiry)."""
        return len(self._last)


class HistogramCell:
    """Decayed label counts of one feature cell and the prediction they imply."""

    __slots__ = ("bounds", "counts", "gap_sums", "prediction", "weight")

    def __init__(self, num_buckets: int, bounds: list[tuple[float, float]]) -> None:
        self.bounds = bounds  # [lo, hi) of every finite bucket
        self.counts = [0.0] * num_buckets
        self.gap_sums = [0.0] * num_buckets  # finite gaps only, for the mean TTL
        self.weight = 0.0
        self.prediction: LifetimePrediction | None = None

    def add(self, bucket: int, gap: float, decay: float, horizon_buckets: int) -> None:
        counts, sums = self.counts, self.gap_sums
        if decay != 1.0:
            for i in range(len(counts)):
                counts[i] *= decay
                sums[i] *= decay
        counts[bucket] += 1.0
        if math.isfinite(gap):
            sums[bucket] += gap
        self.weight = sum(counts)
        best = max(range(len(counts)), key=counts.__getitem__)
        last = len(counts) - 1
        if best == last:
            ttl = math.inf
        else:  # a mean of gaps in [lo, hi); clamp away rounding at the edges
            lo, hi = self.bounds[best]
            ttl = min(max(sums[best] / counts[best], lo), math.nextafter(hi, 0.0))
        reuse = sum(counts[:horizon_buckets]) / self.weight
        self.prediction = LifetimePrediction(reuse, ttl, best)


class OnlineLifetimePredictor(GapLearner):
    """Reuse predictor learned online from observed accesses (see the module docstring).

    ``predict`` returns the probability of a next access within ``horizon_seconds``, the
    expected time to it (the mean observed gap of the predicted bucket; ``inf`` for "later
    or never") and the bucket.
    """

    def __init__(self, config: OnlineLifetimePredictorConfig | None = None) -> None:
        super().__init__(config)
        nb = self.buckets.num_buckets
        self._levels: list[dict[tuple[int, ...], HistogramCell]] = [{}, {}, {}, {}]
        edges = (0.0, *self.config.ttl_bucket_edges)
        self._bounds = [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
        self._root = HistogramCell(nb, self._bounds)
        self._horizon_buckets = self.buckets.bucket(self.config.horizon_seconds)
        self._min_weight = self.config.min_cell_weight
        self._tenant_groups = self.config.num_tenant_groups
        # before any label: "later or never" with an uninformed reuse probability
        self._prior = LifetimePrediction(0.5, math.inf, nb - 1)

    def _encode(self, features: Mapping[str, float]) -> _CellKeys:
        get = features.get
        depth = int(get("prefix_depth", 0))
        count = int(get("access_count", 0))
        since = get("seconds_since_last_access", -1.0)
        kind = int(get("request_kind", 0))
        tenant = int(get("tenant_hash", 0)) % self._tenant_groups
        since_bin = -1 if since < 0 else bisect_right(_SINCE_EDGES, since)
        count_bin = count.bit_length() if count < 256 else 9
        depth_bin = depth.bit_length() if depth > 0 else 0
        return (
            (kind, since_bin, count_bin, depth_bin, tenant),
            (kind, since_bin, count_bin),
            (kind, since_bin),
            (kind,),
        )

    def _predict_encoded(self, encoded: object) -> LifetimePrediction:
        min_weight = self._min_weight
        for level, key in zip(self._levels, encoded):  # type: ignore[call-overload]
            cell = level.get(key)
            if cell is not None and cell.weight >= min_weight:
                return cell.prediction  # type: ignore[no-any-return]
        return self._root.prediction or self._prior

    def _learn(self, encoded: object, bucket: int, gap: float) -> None:
        nb = self.buckets.num_buckets
        decay = self.config.decay
        hb = self._horizon_buckets
        for level, key in zip(self._levels, encoded):  # type: ignore[call-overload]
            cell = level.get(key)
            if cell is None:
                cell = level[key] = HistogramCell(nb, self._bounds)
            cell.add(bucket, gap, decay, hb)
        self._root.add(bucket, gap, decay, hb)

    @property
    def num_cells(self) -> int:
        """Histogram cells learned so far, all levels."""
        return sum(len(level) for level in self._levels)
