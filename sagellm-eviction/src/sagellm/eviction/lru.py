"""Least recently used (anchor: libCacheSim ``LRU``).

A hit moves the key to the most recent end; the victim is the least recent key.
Pinned keys leave the order; the last unpin puts a key back at the most recent end,
since it was in use for as long as it was pinned.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import LRUConfig

__all__ = ["LRUPolicy"]


class LRUPolicy(PolicyBase):
    """LRU over an ordered dict: every operation O(1)."""

    config_class: ClassVar[type[LRUConfig]] = LRUConfig
    name: ClassVar[str] = "lru"

    def __init__(self, config: LRUConfig | None = None, *, capacity: int | None = None) -> None:
        super().__init__(config, capacity)
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # least recent first

    def __contains__(self, key: object) -> bool:
        return key in self._order or key in self._pins

    def __len__(self) -> int:
        return len(self._order) + len(self._pins)

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        self._order[key] = None

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def _remove(self, key: Hashable, pinned: bool) -> None:
        if not pinned:
            del self._order[key]

    def _detach(self, key: Hashable) -> None:
        del self._order[key]

    def _attach(self, key: Hashable) -> None:
        self._order[key] = None

    def _evict_one(self) -> Any:
        if not self._order:
            return NO_VICTIM
        return self._order.popitem(last=False)[0]
