"""Cost-aware eviction that weighs recompute cost by predicted reuse.

Without a predictor the policy is GreedyDual-Size-Frequency (Cherkasova 1998; libCacheSim
``GDSF``): every held key has a priority ``H = L + cost * reuse / size`` (``size`` is the
``num_blocks`` feature the owner gives at insert, else 1: one key, one block), ``reuse`` being the access count since the insert
(``reuse_without_predictor="frequency"``) or 1 (``"none"``, GreedyDual on cost alone);
the victim is the key with the smallest ``H`` (ties: the older priority first) and the
inflation value ``L`` rises to the victim's ``H``, so keys that stop being used age out
against newly refreshed ones.

With a :class:`~sagellm.core.protocols.LifetimePredictor` the policy ranks keys by
*predicted cost density*, the recompute cost a key is expected to save per second it
holds its slot, and lets an online learner choose, victim by victim, between that
ranking and GDSF. The rationale, step by step:

1. **What to rank by.** Belady's rule evicts the key used farthest in the future; its
   learned relaxations (LRB) and Least Hit Density (LHD, Beckmann et al. NSDI'18) rank
   by hits per unit of cache space-time. A prediction ``(p, ttl)`` says: with
   probability ``p`` the key is used again, after about ``ttl`` seconds; otherwise never.
   Holding the key until that use saves ``cost`` with probability ``p`` for ``ttl``
   seconds of a slot, so its density is ``cost * p / ttl``: the lowest goes first. A
   reuse probability for one fixed horizon alone cannot tell a system-prompt block read
   every second from a chat block read again in a minute (both are near 1 within five
   minutes), while a small cache can only keep the former: the ``ttl`` is what scales the
   ranking to the cache.
2. **Never again.** A ``ttl`` of ``inf`` gives density 0: such keys go first, the least
   recently used of them first (if the prediction is wrong, the recent one is the likelier
   to be used).
3. **Aging between accesses.** A prediction made at the last access goes stale: the
   longer a key stays idle past its ``ttl``, the likelier it is that it will never be used
   again. Reading ``(p, ttl)`` as "used again with probability ``p``, after an exponential
   gap of mean ``ttl``", the probability after ``a`` idle seconds has odds
   ``p / (1 - p) * exp(-a / ttl)``. A heap cannot hold priorities that change with time,
   so every key carries a deadline, the moment its density has halved, held in a second
   heap; before victims are chosen, the keys past their deadline are ranked again at the
   current time (and given the next deadline), so every priority in the heap is within a
   factor 2 of its current value. A key with a long record of reuse (odds near the cap
   ``p <= 0.999``) ages slowly; a key of a finished chat quickly.
4. **Little evidence.** The predictor learns per class of features; a key's own history
   tells about that key. The policy keeps, per key, its access count and the sum of its
   gaps between accesses (also across evictions, in a ghost list of as many keys as the
   cache holds, as ARC and LeCaR keep one), and blends them with the prediction as if the
   prediction were ``prior_weight`` earlier observations: ``ttl = (prior_weight * ttl_pred
   + sum(gaps)) / (prior_weight + num_gaps)`` and ``p = (prior_weight * p_pred +
   num_gaps) / (prior_weight + num_gaps)`` (each observed gap is a reuse that happened).
   A "never" prediction of a key that was reused takes the key's own mean gap as ``ttl``.
   The predictor is fed the same history: ``access_count`` counts accesses across
   evictions, ``seconds_since_last_access`` is the real gap (-1 for a key never seen or
   forgotten by the ghost list).
5. **When the predictor is wrong.** Predictions are class averages and a bucketed ``ttl``
   can be off by a factor of a few. As LeCaR and Cacheus do, the policy keeps two experts
   over the same keys, the predicted density ranking and GDSF (``L + cost * count``,
   count across evictions), and a weight ``w`` of the first. Each victim comes from the
   expert of larger weight (ties: the predicted ranking); the ghost list remembers which
   expert evicted each key, and a miss on a remembered key multiplies that expert's weight
   by ``exp(-learning_rate * cost / mean_cost)`` (weights renormalised, each kept within
   [0.01, 0.99] so the choice can always come back). At the cache sizes where the
   predictions rank well the predicted expert leads; where recency and frequency rank
   better, GDSF does.

Every structure is a binary heap with lazy invalidation: a changed priority pushes a new
entry and the old one is skipped when popped, so insert, access and evict are O(log n)
amortised (a re-ranking at a deadline is one push, and a key is re-ranked at most a few
times per idle period before its density reaches the ``min_reuse`` floor, after which it
has no deadline). Heaps are rebuilt when stale entries outnumber live ones by
``heap_compaction_factor``. A pinned key's heap entries go stale; the last unpin pushes
it again at the current ``L`` (and, with a predictor, with its last prediction at age 0),
as if it had just been used (it was in use while pinned).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.core.errors import ConfigError
from sagellm.core.protocols import LifetimePredictor
from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import CostAwareConfig

__all__ = ["CostAwarePolicy"]

# cap of the blended reuse probability: a probability of 1 would never age
_MAX_REUSE = 0.999
# shortest ttl taken from a prediction (seconds): a zero ttl would be an infinite density
_MIN_TTL = 1e-6
# bounds of the weight of either expert, so the choice can always swing back
_MIN_WEIGHT = 0.01
_PREDICTED, _FREQUENCY = 0, 1


class _Entry:
    __slots__ = (
        "access_count",
        "cost",
        "features",
        "gap_sum",
        "last_access",
        "num_gaps",
        "odds",
        "priority",
        "pseq",
        "ranked_at",
        "seq",
        "ttl",
    )

    def __init__(self, cost: float, now: float, features: Mapping[str, float] | None) -> None:
        self.cost = cost
        self.access_count = 1
        self.last_access = now
        self.features = features
        self.priority = 0.0  # H (frequency ranking) or density (predicted ranking)
        self.seq = -1  # sequence of the live GDSF heap entry; -1 while pinned
        self.pseq = -1  # sequence of the live density/deadline heap entries; -1 while pinned
        self.gap_sum = 0.0  # seconds between accesses, summed (across evictions)
        self.num_gaps = 0
        self.odds = 0.0  # p / (1 - p) of the blended prediction at ``ranked_at``
        self.ttl = math.inf  # blended expected gap (seconds)
        self.ranked_at = now  # time the odds refer to


class CostAwarePolicy(PolicyBase):
    """GreedyDual-Size-Frequency, or with a predictor predicted cost density mixed with it."""

    config_class: ClassVar[type[CostAwareConfig]] = CostAwareConfig
    name: ClassVar[str] = "cost_aware"

    def __init__(
        self,
        config: CostAwareConfig | None = None,
        *,
        capacity: int | None = None,
        predictor: LifetimePredictor | None = None,
    ) -> None:
        super().__init__(config, capacity)
        if predictor is not None and not isinstance(predictor, LifetimePredictor):
            raise ConfigError(
                "predictor must implement sagellm.core.protocols.LifetimePredictor (observe, "
                f"predict, make_stats); got {type(predictor).__name__}"
            )
        self._predictor = predictor
        self._entries: dict[Hashable, _Entry] = {}  # every held key, pinned ones included
        self._heap: list[tuple[float, int, Hashable]] = []  # GDSF: (H, seq, key)
        self._seq = 0
        self._inflation = 0.0
        self._frequency = self.config.reuse_without_predictor == "frequency"
        self._min_reuse = self.config.min_reuse
        self._compaction = self.config.heap_compaction_factor
        # predictor only: density ranking, its deadlines, ghosts, expert weight
        self._pheap: list[tuple[float, float, int, Hashable]] = []  # (density, last, pseq, key)
        self._deadlines: list[tuple[float, int, Hashable]] = []  # (time, pseq, key)
        # evicted key -> (access_count, last_access, gap_sum, num_gaps, expert that evicted it)
        self._ghosts: OrderedDict[Hashable, tuple[int, float, float, int, int]] = OrderedDict()
        self._weight = 0.5  # of the predicted ranking; the frequency ranking has 1 - weight
        self._clock = -math.inf  # latest time seen
        self._cost_sum = 0.0
        self._num_costs = 0
        self._prior = self.config.prior_weight
        self._rate = self.config.learning_rate

    @property
    def predictor(self) -> LifetimePredictor | None:
        """The predictor consulted for reuse (None: access frequency)."""
        return self._predictor

    @property
    def inflation(self) -> float:
        """``L``: the priority of the latest victim of the frequency ranking."""
        return self._inflation

    @property
    def predicted_weight(self) -> float:
        """Weight of the predicted ranking against frequency (0.5 at the start)."""
        return self._weight

    def priority(self, key: Hashable) -> float:
        """``H`` of a held key; with a predictor its density when last ranked."""
        return self._entries[key].priority

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ priority

    def _observe(self, key: Hashable, entry: _Entry, gap: float, now: float) -> None:
        """Feed the predictor this access and store the blended prediction in ``entry``."""
        predictor = self._predictor
        assert predictor is not None
        features = dict(entry.features) if entry.features else {}
        features["access_count"] = float(entry.access_count)
        features["seconds_since_last_access"] = gap
        predictor.observe(key, features, now)
        prediction = predictor.predict(features)
        p, ttl = prediction.reuse_probability, prediction.ttl_seconds
        n = entry.num_gaps
        if n:
            prior = self._prior
            if ttl == math.inf:
                ttl = entry.gap_sum / n
            else:
                ttl = (prior * ttl + entry.gap_sum) / (prior + n)
            p = (prior * p + n) / (prior + n)
        p = min(max(p, self._min_reuse), _MAX_REUSE)
        entry.odds = p / (1.0 - p)
        entry.ttl = max(ttl, _MIN_TTL)
        entry.ranked_at = now

    def _push(self, key: Hashable, entry: _Entry) -> None:
        """Push ``entry`` into the GDSF heap at ``L + cost * reuse``."""
        if self._predictor is None:
            reuse = float(entry.access_count) if self._frequency else 1.0
            entry.priority = self._inflation + entry.cost * reuse
            priority = entry.priority
        else:
            priority = self._inflation + entry.cost * entry.access_count
        self._seq += 1
        entry.seq = self._seq
        heapq.heappush(self._heap, (priority, self._seq, key))
        # the density heap grows a little faster (re-rankings): check the larger one
        longest = len(self._pheap) if len(self._pheap) > len(self._heap) else len(self._heap)
        if longest > self._compaction * len(self._entries) + 64:
            self._compact()

    def _push_predicted(self, key: Hashable, entry: _Entry, now: float) -> None:
        """Push ``entry`` into the density heap as of ``now``, with its next deadline."""
        ttl = entry.ttl
        self._seq += 1
        entry.pseq = seq = self._seq
        if ttl == math.inf:
            entry.priority = 0.0
        else:
            odds = entry.odds
            age = now - entry.ranked_at
            if age > 0.0:
                odds *= math.exp(-age / ttl)
            p = odds / (1.0 + odds)
            floor = self._min_reuse
            if p > floor:
                # the density halves when the odds fall to odds / (2 + odds)
                heapq.heappush(self._deadlines, (now + ttl * math.log(2.0 + odds), seq, key))
            else:
                p = floor
            entry.priority = entry.cost * p / ttl
        heapq.heappush(self._pheap, (entry.priority, entry.last_access, seq, key))

    def _compact(self) -> None:
        entries = self._entries
        self._heap = [
            item
            for item in self._heap
            if (e := entries.get(item[2])) is not None and e.seq == item[1]
        ]
        heapq.heapify(self._heap)
        if self._predictor is not None:
            self._pheap = [
                item
                for item in self._pheap
                if (e := entries.get(item[3])) is not None and e.pseq == item[2]
            ]
            heapq.heapify(self._pheap)
            self._deadlines = [
                item
                for item in self._deadlines
                if (e := entries.get(item[2])) is not None and e.pseq == item[1]
            ]
            heapq.heapify(self._deadlines)

    def _regret(self, expert: int, cost: float) -> None:
        """A key ``expert`` evicted was missed: shift weight to the other expert."""
        mean_cost = self._cost_sum / self._num_costs if self._num_costs else 1.0
        factor = math.exp(-self._rate * (cost / mean_cost if mean_cost > 0.0 else 1.0))
        w = self._weight
        if expert == _PREDICTED:
            w = w * factor / (w * factor + 1.0 - w)
        else:
            w = w / (w + (1.0 - w) * factor)
        self._weight = min(max(w, _MIN_WEIGHT), 1.0 - _MIN_WEIGHT)

    # ------------------------------------------------------------------ hooks

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        if now is None:
            now = time.monotonic()
        if features:
            # A key of several blocks (a radix edge) frees them all when evicted: rank by
            # cost per block, GDSF's cost / size.
            size = features.get("num_blocks", 1.0)
            if size > 1.0:
                cost = cost / size
        entry = _Entry(float(cost), now, features)
        self._entries[key] = entry
        if self._predictor is None:
            self._push(key, entry)
            return
        if now > self._clock:
            self._clock = now
        self._cost_sum += entry.cost
        self._num_costs += 1
        gap = -1.0
        ghost = self._ghosts.pop(key, None)
        if ghost is not None:
            count, last, gap_sum, num_gaps, expert = ghost
            self._regret(expert, entry.cost)
            gap = max(0.0, now - last)
            entry.access_count = count + 1
            entry.gap_sum = gap_sum + gap
            entry.num_gaps = num_gaps + 1
        self._observe(key, entry, gap, now)
        self._push(key, entry)
        self._push_predicted(key, entry, now)

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        if now is None:
            now = time.monotonic()
        entry = self._entries[key]
        entry.access_count += 1
        gap = now - entry.last_access
        entry.last_access = now
        if features is not None:
            entry.features = features
        if self._predictor is not None:
            if now > self._clock:
                self._clock = now
            entry.gap_sum += max(0.0, gap)
            entry.num_gaps += 1
            self._observe(key, entry, gap, now)
        if key in self._pins:
            return
        self._push(key, entry)
        if self._predictor is not None:
            self._push_predicted(key, entry, now)

    def _remove(self, key: Hashable, pinned: bool) -> None:
        del self._entries[key]

    def _detach(self, key: Hashable) -> None:
        entry = self._entries[key]
        entry.seq = entry.pseq = -1

    def _attach(self, key: Hashable) -> None:
        entry = self._entries[key]
        self._push(key, entry)
        if self._predictor is not None:
            now = max(self._clock, entry.ranked_at)
            entry.ranked_at = now  # in use while pinned: the prediction ages from now
            self._push_predicted(key, entry, now)

    def _begin_evict(self) -> None:
        """Rank again every key whose density has halved since it was last ranked."""
        if self._predictor is None:
            return
        deadlines, entries, now = self._deadlines, self._entries, self._clock
        while deadlines and deadlines[0][0] <= now:
            _, seq, key = heapq.heappop(deadlines)
            entry = entries.get(key)
            if entry is not None and entry.pseq == seq:
                self._push_predicted(key, entry, now)

    def _evict_one(self) -> Any:
        entries = self._entries
        if self._predictor is not None and self._weight >= 0.5:
            pheap = self._pheap
            while pheap:
                _, _, seq, key = heapq.heappop(pheap)
                entry = entries.get(key)
                if entry is not None and entry.pseq == seq:
                    return self._drop(key, entry, _PREDICTED)
            return NO_VICTIM
        heap = self._heap
        while heap:
            priority, seq, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is None or entry.seq != seq:
                continue
            self._inflation = priority
            return self._drop(key, entry, _FREQUENCY)
        return NO_VICTIM

    def _drop(self, key: Hashable, entry: _Entry, expert: int) -> Hashable:
        del self._entries[key]
        if self._predictor is not None:
            ghosts = self._ghosts
            ghosts[key] = (
                entry.access_count,
                entry.last_access,
                entry.gap_sum,
                entry.num_gaps,
                expert,
            )
            if len(ghosts) > (self._capacity or self.effective_capacity):
                ghosts.popitem(last=False)
        return key
