"""Online TTL-bucket predictor over back-off histograms (registered as ``online``).

Anchor: learned cache replacement (LRB, "learning relaxed Belady"), reduced to the few
features an engine has at an access: prefix depth, access count, time since the previous
access, request kind, tenant. Each access is a training example whose label arrives
later: the gap to the same key's next access, or "later or never" once the key has been
idle longer than the last TTL edge. Labels go into histograms over discretised features
at four levels of detail; a prediction reads the finest cell with enough evidence
(backing off to coarser cells), so new tenants or rare kinds fall back to what is known
about their kind. Cells forget slowly, following drifting traffic: at each label a cell
receives, its earlier labels weigh ``decay`` times less (a label ``k`` updates of that
cell ago weighs ``decay ** k``), and the TTL of a bucket is the mean of its gaps under
those weights.

The cells form a tree (kind -> recency -> count -> depth and tenant), each node keyed by a
small integer, and an access remembers the five cells it belongs to (four levels plus the
global one) until its label arrives, so labelling does no lookups. Forgetting is lazy: a
cell does not multiply its counts by ``decay`` at each label, it adds the label with
weight ``decay ** -n`` (``n`` its labels so far) and rescales once that weight grows
large; the ratios a prediction reads are the same as with eager decay. Each cell keeps
its arg-max bucket up to date (the prequential score reads only that) and computes its
full prediction when it is first read after a change. The five cells of every feature
path observed so far are cached: a prediction is one dict lookup plus a cached result
(a tree walk of at most four lookups for a path never observed); a label costs five
constant updates.
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
_INF = math.inf
# a cell rescales its stored counts before the weight of a new label would pass this
_MAX_UNIT = 1e100


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
        self._edges = self.buckets.edges
        self._max_gap = config.ttl_bucket_edges[-1]
        self._max_keys = config.max_tracked_keys
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
        bucket = bisect_right(self._edges, gap)
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
            gap = now - prev[0]
            self._label(prev[1], gap if gap > 0.0 else 0.0)
        if last:
            horizon = now - self._max_gap
            oldest_key = next(iter(last))
            t, encoded = last[oldest_key]
            while t <= horizon:
                del last[oldest_key]
                self._label(encoded, _INF)
                if not last:
                    break
                oldest_key = next(iter(last))
                t, encoded = last[oldest_key]
            if len(last) >= self._max_keys:
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
    """Label counts of one feature cell, decayed lazily, and the prediction they imply.

    ``counts[i] / unit`` is the decayed count of bucket ``i`` (``unit`` is what the latest
    label weighed when it was added: ``decay ** -(n - 1)`` after ``n`` labels, up to
    rescaling), ``best`` the first bucket of the largest count, ``mean_gaps[i]`` the
    decayed mean of the finite gaps of bucket ``i`` and ``weight`` the decayed number of
    labels. ``children`` holds the next finer cells (``None`` in the finest level).
    """

    __slots__ = ("best", "children", "counts", "mean_gaps", "prediction", "unit", "weight")

    def __init__(self, num_buckets: int, decay: float, leaf: bool = False) -> None:
        self.counts = [0.0] * num_buckets
        self.mean_gaps = [0.0] * num_buckets
        self.unit = decay  # the first label is added with weight 1
        self.weight = 0.0
        self.best = num_buckets - 1
        self.prediction: LifetimePrediction | None = None  # None: stale or never computed
        self.children: dict[int, HistogramCell] | None = None if leaf else {}

    def add(self, bucket: int, gap: float, decay: float) -> None:
        """Count a label (``gap`` in seconds, ``inf`` for "later or never").

        The reference form of the update that :meth:`OnlineLifetimePredictor._label`
        inlines. Only ``counts[bucket]`` grows (the others keep their stored value, which
        is their decay), so the largest count is either the old one or this one.
        """
        unit = self.unit
        if unit > _MAX_UNIT * decay:
            unit = self.rescale(decay)
        unit /= decay
        self.unit = unit
        counts = self.counts
        count = counts[bucket] + unit
        counts[bucket] = count
        best = self.best
        if count > counts[best] or (count == counts[best] and bucket < best):
            self.best = bucket
        if gap < _INF:
            mean = self.mean_gaps[bucket]
            self.mean_gaps[bucket] = mean + (gap - mean) * (unit / count)
        self.weight = self.weight * decay + 1.0
        self.prediction = None

    def rescale(self, decay: float) -> float:
        """Divide the stored counts so that the next label weighs 1 again; the new unit."""
        factor = decay / self.unit
        counts = self.counts = [c * factor for c in self.counts]
        self.best = counts.index(max(counts))  # rounding may have made a tie
        self.unit = decay
        return decay

    def decayed_counts(self) -> list[float]:
        """Bucket counts as eager decay would hold them (for tests and inspection)."""
        unit = self.unit
        return [c / unit for c in self.counts]


class OnlineLifetimePredictor(GapLearner):
    """Reuse predictor learned online from observed accesses (see the module docstring).

    ``predict`` returns the probability of a next access within ``horizon_seconds``, the
    expected time to it (the mean observed gap of the predicted bucket; ``inf`` for "later
    or never") and the bucket.
    """

    def __init__(self, config: OnlineLifetimePredictorConfig | None = None) -> None:
        super().__init__(config)
        nb = self._num_buckets = self.buckets.num_buckets
        self._decay = self.config.decay
        self._rescale_above = _MAX_UNIT * self._decay
        edges = (0.0, *self.config.ttl_bucket_edges)
        # [lo, hi) of every finite bucket, as [lo, largest float below hi]
        self._bounds = [(edges[i], math.nextafter(edges[i + 1], 0.0)) for i in range(nb - 1)]
        self._root = HistogramCell(nb, self._decay, leaf=True)
        self._kinds: dict[int, HistogramCell] = {}  # the coarsest level of the tree
        # the cells of every feature path observed so far, by its four keys
        self._paths: dict[tuple[int, int, int, int], tuple[HistogramCell, ...]] = {}
        self._horizon_buckets = self.buckets.bucket(self.config.horizon_seconds)
        # empty cells (made for an access not labelled yet) are never trusted
        self._min_weight = max(self.config.min_cell_weight, math.ulp(0.0))
        self._tenant_groups = self.config.num_tenant_groups
        # before any label: "later or never" with an uninformed reuse probability
        self._prior = LifetimePrediction(0.5, math.inf, nb - 1)

    def _bins(self, features: Mapping[str, float]) -> tuple[int, int, int, int]:
        """Keys of the four tree levels: kind, recency, count, depth and tenant."""
        get = features.get
        since = get("seconds_since_last_access", -1.0)
        count = int(get("access_count", 0))
        depth = int(get("prefix_depth", 0))
        groups = self._tenant_groups
        return (
            int(get("request_kind", 0)),
            -1 if since < 0 else bisect_right(_SINCE_EDGES, since),
            count.bit_length() if count < 256 else 9,
            (depth.bit_length() if depth > 0 else 0) * groups + int(get("tenant_hash", 0)) % groups,
        )

    def _encode(self, features: Mapping[str, float]) -> tuple[HistogramCell, ...]:
        """The cells of an access, finest first, the global cell last (made if missing)."""
        bins = self._bins(features)
        cells = self._paths.get(bins)
        if cells is None:
            cells = self._paths[bins] = self._make_path(bins)
        return cells

    def _make_path(self, bins: tuple[int, int, int, int]) -> tuple[HistogramCell, ...]:
        nb, decay = self._num_buckets, self._decay
        level = self._kinds
        path = []
        for depth, key in enumerate(bins):
            cell = level.get(key)
            if cell is None:
                cell = level[key] = HistogramCell(nb, decay, leaf=depth == len(bins) - 1)
            path.append(cell)
            level = cell.children  # type: ignore[assignment]
        return (*reversed(path), self._root)

    def predict(self, features: Mapping[str, float]) -> LifetimePrediction:
        """Predicted reuse of an entry whose current features are ``features``."""
        self._num_predictions += 1
        min_weight = self._min_weight
        bins = self._bins(features)
        cells = self._paths.get(bins)
        if cells is not None:  # _predict_encoded inlined
            for cell in cells:
                if cell.weight >= min_weight:
                    break
            return cell.prediction or self._resolve(cell)
        # a path never observed: walk the tree from coarse to fine while the cells are
        # trusted (a cell has had at least as many labels as any cell below it, hence at
        # least its weight)
        best = self._root
        level = self._kinds
        for key in bins:
            found = level.get(key)
            if found is None or found.weight < min_weight:
                break
            best = found
            if found.children is None:
                break
            level = found.children
        return best.prediction or self._resolve(best)

    def _predict_encoded(self, encoded: object) -> LifetimePrediction:
        cells: tuple[HistogramCell, ...] = encoded  # type: ignore[assignment]
        min_weight = self._min_weight
        for cell in cells:  # the global cell, last, answers when no finer one is trusted
            if cell.weight >= min_weight:
                break
        return cell.prediction or self._resolve(cell)

    def _resolve(self, cell: HistogramCell) -> LifetimePrediction:
        """Compute and cache the prediction of a cell (the prior before any label)."""
        if cell.weight == 0.0:
            return self._prior
        counts = cell.counts
        best = cell.best
        if best == len(counts) - 1:
            ttl = math.inf
        else:  # a mean of gaps in [lo, hi); clamp away rounding at the edges
            lo, below_hi = self._bounds[best]
            ttl = min(max(cell.mean_gaps[best], lo), below_hi)
        # a prefix sum over the whole sum of the same non-negative numbers: never above 1
        reuse = sum(counts[: self._horizon_buckets]) / sum(counts)
        prediction = cell.prediction = LifetimePrediction(reuse, ttl, best)
        return prediction

    def _label(self, encoded: object, gap: float) -> None:
        # GapLearner._label with _predict_encoded (only the bucket is needed, and each cell
        # keeps its best bucket) and _learn (HistogramCell.add, for five cells) inlined:
        # this runs at almost every observe
        cells: tuple[HistogramCell, ...] = encoded  # type: ignore[assignment]
        bucket = bisect_right(self._edges, gap)
        min_weight = self._min_weight
        for cell in cells:  # the global cell, last, answers when no finer one is trusted
            if cell.weight >= min_weight:
                break
        self._num_scored += 1
        if cell.best == bucket:  # a cell without labels holds the prior's bucket
            self._num_correct += 1
        decay = self._decay
        rescale_above = self._rescale_above
        finite = gap < _INF
        for cell in cells:
            unit = cell.unit
            if unit > rescale_above:
                unit = cell.rescale(decay)
            unit /= decay
            cell.unit = unit
            counts = cell.counts
            count = counts[bucket] + unit
            counts[bucket] = count
            top = counts[cell.best]
            if count > top or (count == top and bucket < cell.best):
                cell.best = bucket
            if finite:
                means = cell.mean_gaps
                mean = means[bucket]
                means[bucket] = mean + (gap - mean) * (unit / count)
            cell.weight = cell.weight * decay + 1.0
            cell.prediction = None

    def _learn(self, encoded: object, bucket: int, gap: float) -> None:
        for cell in encoded:  # type: ignore[attr-defined]
            cell.add(bucket, gap, self._decay)

    @property
    def num_cells(self) -> int:
        """Histogram cells with at least one label, all levels (the global one excluded)."""
        num = 0
        stack = list(self._kinds.values())
        while stack:
            cell = stack.pop()
            num += cell.weight > 0.0
            if cell.children:
                stack.extend(cell.children.values())
        return num
