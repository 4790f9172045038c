"""Cost-aware GreedyDual eviction that weighs recompute cost by predicted reuse.

Anchor: GreedyDual-Size-Frequency (Cherkasova 1998; libCacheSim ``GDSF``). Every held
key has a priority ``H = L + cost * reuse / size`` (``size`` is 1: one key, one block);
the victim is the key with the smallest ``H`` (ties: the older priority first) and the
inflation value ``L`` rises to the victim's ``H``, so keys that stop being used age out
against newly refreshed ones. ``H`` is recomputed at every insert and access.

``reuse``:

- with a :class:`~sagellm.core.protocols.LifetimePredictor`: the predicted
  ``reuse_probability`` of the entry (at least ``min_reuse``). The policy feeds
  ``predictor.observe(key, features, now)`` at every insert and access, with the owner's
  features (``prefix_depth``, ``request_kind``, ``tenant_hash``; the latest given, or
  those of an earlier access) merged with two it tracks itself: ``access_count``
  (accesses since the insert, this one included) and ``seconds_since_last_access``
  (-1 at the insert), then asks ``predictor.predict(features)``;
- without one: the access count (``reuse_without_predictor="frequency"``, GDSF) or 1
  (``"none"``, GreedyDual on cost alone).

A binary heap holds ``(H, sequence, key)``; a changed priority pushes a new entry and
the old one is skipped when popped (lazy invalidation), so every operation is
O(log n); the heap is rebuilt when stale entries outnumber live ones by
``heap_compaction_factor``. A pinned key's heap entries go stale; the last unpin
pushes it again at ``L + cost * reuse`` with the current ``L``, as if it had just been
used (it was in use while pinned).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.core.errors import ConfigError
from sagellm.core.protocols import LifetimePredictor
from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import CostAwareConfig

__all__ = ["CostAwarePolicy"]


class _Entry:
    __slots__ = ("access_count", "cost", "features", "last_access", "priority", "seq")

    def __init__(self, cost: float, now: float, features: Mapping[str, float] | None) -> None:
        self.cost = cost
        self.access_count = 1
        self.last_access = now
        self.features = features
        self.priority = 0.0
        self.seq = -1  # sequence of the live heap entry; -1 while pinned


class CostAwarePolicy(PolicyBase):
    """GreedyDual over a lazily invalidated heap; reuse from a predictor or frequency."""

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
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = 0
        self._inflation = 0.0
        self._frequency = self.config.reuse_without_predictor == "frequency"
        self._min_reuse = self.config.min_reuse
        self._compaction = self.config.heap_compaction_factor

    @property
    def predictor(self) -> LifetimePredictor | None:
        """The predictor consulted for reuse (None: access frequency)."""
        return self._predictor

    @property
    def inflation(self) -> float:
        """``L``: the priority of the latest victim."""
        return self._inflation

    def priority(self, key: Hashable) -> float:
        """Current ``H`` of a held key."""
        return self._entries[key].priority

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ priority

    def _observe(self, key: Hashable, entry: _Entry, gap: float, now: float) -> float:
        """Feed the predictor this access; the reuse weight of the entry after it."""
        predictor = self._predictor
        if predictor is None:
            return float(entry.access_count) if self._frequency else 1.0
        features = dict(entry.features) if entry.features else {}
        features["access_count"] = float(entry.access_count)
        features["seconds_since_last_access"] = gap
        predictor.observe(key, features, now)
        reuse = predictor.predict(features).reuse_probability
        return reuse if reuse > self._min_reuse else self._min_reuse

    def _push(self, key: Hashable, entry: _Entry, reuse: float) -> None:
        entry.priority = self._inflation + entry.cost * reuse
        self._seq += 1
        entry.seq = self._seq
        heapq.heappush(self._heap, (entry.priority, self._seq, key))
        if len(self._heap) > self._compaction * len(self._entries) + 64:
            self._compact()

    def _compact(self) -> None:
        entries = self._entries
        self._heap = [
            item
            for item in self._heap
            if (e := entries.get(item[2])) is not None and e.seq == item[1]
        ]
        heapq.heapify(self._heap)

    def _reuse_now(self, entry: _Entry) -> float:
        """Reuse weight without an access (for an unpin): no observation."""
        predictor = self._predictor
        if predictor is None:
            return float(entry.access_count) if self._frequency else 1.0
        features = dict(entry.features) if entry.features else {}
        features["access_count"] = float(entry.access_count)
        features["seconds_since_last_access"] = 0.0
        reuse = predictor.predict(features).reuse_probability
        return reuse if reuse > self._min_reuse else self._min_reuse

    # ------------------------------------------------------------------ hooks

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        if now is None:
            now = time.monotonic()
        entry = _Entry(float(cost), now, features)
        self._entries[key] = entry
        self._push(key, entry, self._observe(key, entry, -1.0, now))

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
        reuse = self._observe(key, entry, gap, now)
        if key in self._pins:
            return
        self._push(key, entry, reuse)

    def _remove(self, key: Hashable, pinned: bool) -> None:
        del self._entries[key]

    def _detach(self, key: Hashable) -> None:
        self._entries[key].seq = -1

    def _attach(self, key: Hashable) -> None:
        entry = self._entries[key]
        self._push(key, entry, self._reuse_now(entry))

    def _evict_one(self) -> Any:
        heap, entries = self._heap, self._entries
        while heap:
            priority, seq, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is None or entry.seq != seq:
                continue
            del entries[key]
            self._inflation = priority
            return key
        return NO_VICTIM
