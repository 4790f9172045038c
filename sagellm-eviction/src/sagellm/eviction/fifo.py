"""First in, first out (anchor: libCacheSim ``FIFO``).

Hits change nothing; the victim is the oldest insertion. A pinned key leaves the queue;
the last unpin puts it at the tail (youngest), which keeps unpin O(1) and gives a key
that was just in use the longest stay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import FIFOConfig

__all__ = ["FIFOPolicy"]


class FIFOPolicy(PolicyBase):
    """FIFO over an ordered dict: every operation O(1)."""

    config_class: ClassVar[type[FIFOConfig]] = FIFOConfig
    name: ClassVar[str] = "fifo"

    def __init__(self, config: FIFOConfig | None = None, *, capacity: int | None = None) -> None:
        super().__init__(config, capacity)
        self._queue: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def __contains__(self, key: object) -> bool:
        return key in self._queue or key in self._pins

    def __len__(self) -> int:
        return len(self._queue) + len(self._pins)

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        self._queue[key] = None

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        pass

    def _remove(self, key: Hashable, pinned: bool) -> None:
        if not pinned:
            del self._queue[key]

    def _detach(self, key: Hashable) -> None:
        del self._queue[key]

    def _attach(self, key: Hashable) -> None:
        self._queue[key] = None

    def _evict_one(self) -> Any:
        if not self._queue:
            return NO_VICTIM
        return self._queue.popitem(last=False)[0]
