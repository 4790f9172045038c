"""Least frequently used (anchor: libCacheSim ``LFU``, its C implementation).

Every key counts its accesses since it was inserted (insert = 1, no cap; a re-inserted
key starts again at 1). The victim has the lowest count; among equal counts the key that
reached that count first goes first (each count keeps a FIFO of its keys, a hit appends
the key to the next count's FIFO). This is libCacheSim's rule, unlike LFU variants that
break ties by recency.

A pinned key leaves its count's FIFO but keeps counting hits; the last unpin appends it
to the FIFO of its current count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import LFUConfig

__all__ = ["LFUPolicy"]


class LFUPolicy(PolicyBase):
    """LFU with one FIFO per access count: O(1) per access, eviction O(1) amortised."""

    config_class: ClassVar[type[LFUConfig]] = LFUConfig
    name: ClassVar[str] = "lfu"

    def __init__(self, config: LFUConfig | None = None, *, capacity: int | None = None) -> None:
        super().__init__(config, capacity)
        self._freq: dict[Hashable, int] = {}  # every held key, pinned ones included
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}  # count -> FIFO, non-empty
        self._min_freq = 1  # a lower bound of the smallest count with a bucket

    def frequency(self, key: Hashable) -> int:
        """Accesses of a held key since its insert (the insert counts as one)."""
        return self._freq[key]

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def _push(self, key: Hashable, freq: int) -> None:
        bucket = self._buckets.get(freq)
        if bucket is None:
            bucket = self._buckets[freq] = OrderedDict()
        bucket[key] = None

    def _pull(self, key: Hashable, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        self._freq[key] = 1
        self._push(key, 1)
        self._min_freq = 1

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        freq = self._freq[key]
        self._freq[key] = freq + 1
        if key in self._pins:
            return
        self._pull(key, freq)
        self._push(key, freq + 1)
        if freq == self._min_freq and freq not in self._buckets:
            self._min_freq = freq + 1

    def _remove(self, key: Hashable, pinned: bool) -> None:
        freq = self._freq.pop(key)
        if not pinned:
            self._pull(key, freq)

    def _detach(self, key: Hashable) -> None:
        self._pull(key, self._freq[key])

    def _attach(self, key: Hashable) -> None:
        freq = self._freq[key]
        self._push(key, freq)
        if freq < self._min_freq:
            self._min_freq = freq

    def _evict_one(self) -> Any:
        buckets = self._buckets
        if not buckets:
            return NO_VICTIM
        bucket = buckets.get(self._min_freq)
        if bucket is None:
            # the smallest count emptied (eviction, pin or removal): rare, and there are
            # only as many buckets as distinct counts
            self._min_freq = min(buckets)
            bucket = buckets[self._min_freq]
        key = bucket.popitem(last=False)[0]
        if not bucket:
            del buckets[self._min_freq]
        del self._freq[key]
        return key
