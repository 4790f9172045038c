"""Adaptive Replacement Cache (anchor: libCacheSim ``ARC``; Megiddo and Modha, FAST 2003).

Resident keys are in T1 (seen once) or T2 (seen again); B1 and B2 remember keys evicted
from T1 and T2. ``p`` is T1's target size, a float starting at 0. With ``c`` the
capacity (or, without one, the high-water mark of held keys):

- hit in T1 or T2: the key moves to T2's most recent end;
- miss that is in B1: ``p = min(p + max(|B2| / |B1|, 1), c)``; in B2:
  ``p = max(p - max(|B1| / |B2|, 1), 0)`` (sizes before the key leaves its ghost); if
  room is needed, REPLACE; the key enters T2;
- other miss, if room is needed: when ``|T1| + |B1| + 1 > c``, drop B1's oldest and
  REPLACE, or, with B1 empty, evict T1's least recent key without a ghost; otherwise,
  when ``|T1| + |B1| + |T2| + |B2| >= 2c``, drop B2's oldest, then REPLACE; the key
  enters T1;
- REPLACE evicts T1's least recent key into B1 when T1 is non-empty and
  ``|T1| > p`` (or ``|T1| == p`` on a B2 hit), or when T2 is empty; else T2's least
  recent key into B2.

These are libCacheSim's rules (which differ from the paper in when the ghosts are
trimmed). Ghost hits and the get loop: libCacheSim finds the missed key in a ghost,
adapts ``p``, then evicts; here the owner asks ``key in policy`` first, so
:meth:`ARCPolicy.__contains__` remembers the last ghost key it was asked about, and the
next :meth:`evict` adapts ``p`` and takes the ghost-hit branch. An owner that never asks
gets the adaptation and the T2 admission at insert, after a miss-branch eviction.

A pinned key leaves its list but still counts in ``|T1|`` or ``|T2|``; a hit while
pinned still promotes it from T1 to T2; the last unpin appends it at the most recent end
of its list. REPLACE takes from the other list when the chosen one has only pinned keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import ARCConfig

__all__ = ["ARCPolicy"]


class ARCPolicy(PolicyBase):
    """ARC over four ordered dicts (least recent first): every operation O(1)."""

    config_class: ClassVar[type[ARCConfig]] = ARCConfig
    name: ClassVar[str] = "arc"

    def __init__(self, config: ARCConfig | None = None, *, capacity: int | None = None) -> None:
        super().__init__(config, capacity)
        self._t1: OrderedDict[Hashable, None] = OrderedDict()  # unpinned, least recent first
        self._t2: OrderedDict[Hashable, None] = OrderedDict()
        self._b1: OrderedDict[Hashable, None] = OrderedDict()  # ghosts, oldest first
        self._b2: OrderedDict[Hashable, None] = OrderedDict()
        self._where: dict[Hashable, int] = {}  # every held key -> 1 (T1) or 2 (T2)
        self._n1 = 0  # |T1| with pinned keys
        self._n2 = 0
        self._p = 0.0
        self._probe: Any = NO_VICTIM  # ghost key last asked about by __contains__
        self._ghost_hit: Any = NO_VICTIM  # ghost key whose hit the current eviction serves
        self._ghost_hit_in_b2 = False

    # ------------------------------------------------------------------ inspection

    @property
    def p(self) -> float:
        """T1's target size."""
        return self._p

    def lists(self) -> dict[str, list[Hashable]]:
        """Evictable keys of T1 and T2 and the ghosts B1 and B2, least recent first."""
        return {
            "t1": list(self._t1),
            "t2": list(self._t2),
            "b1": list(self._b1),
            "b2": list(self._b2),
        }

    def __contains__(self, key: object) -> bool:
        if key in self._where:
            return True
        if key in self._b1 or key in self._b2:
            self._probe = key
        return False

    def __len__(self) -> int:
        return len(self._where)

    # ------------------------------------------------------------------ hooks

    def _adapt(self, key: Hashable) -> bool:
        """Ghost hit of ``key``: move p, drop the ghost; True when it was in B2."""
        b1, b2 = self._b1, self._b2
        if key in b1:
            delta = len(b2) / len(b1)
            self._p = min(self._p + (delta if delta > 1.0 else 1.0), self.effective_capacity)
            del b1[key]
            return False
        delta = len(b1) / len(b2)
        self._p = max(self._p - (delta if delta > 1.0 else 1.0), 0.0)
        del b2[key]
        return True

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        self._probe = NO_VICTIM
        if self._ghost_hit == key:
            to_t2 = True
        elif key in self._b1 or key in self._b2:
            self._adapt(key)
            to_t2 = True
        else:
            to_t2 = False
        self._ghost_hit = NO_VICTIM
        if to_t2:
            self._where[key] = 2
            self._n2 += 1
            self._t2[key] = None
        else:
            self._where[key] = 1
            self._n1 += 1
            self._t1[key] = None

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        pinned = key in self._pins
        if self._where[key] == 1:
            self._where[key] = 2
            self._n1 -= 1
            self._n2 += 1
            if not pinned:
                del self._t1[key]
                self._t2[key] = None
        elif not pinned:
            self._t2.move_to_end(key)

    def _remove(self, key: Hashable, pinned: bool) -> None:
        where = self._where.pop(key)
        if where == 1:
            self._n1 -= 1
            if not pinned:
                del self._t1[key]
        else:
            self._n2 -= 1
            if not pinned:
                del self._t2[key]

    def _detach(self, key: Hashable) -> None:
        if self._where[key] == 1:
            del self._t1[key]
        else:
            del self._t2[key]

    def _attach(self, key: Hashable) -> None:
        if self._where[key] == 1:
            self._t1[key] = None
        else:
            self._t2[key] = None

    def _begin_evict(self) -> None:
        probe = self._probe
        if probe is not NO_VICTIM:
            self._probe = NO_VICTIM
            if probe not in self._where and (probe in self._b1 or probe in self._b2):
                self._ghost_hit_in_b2 = self._adapt(probe)
                self._ghost_hit = probe

    def _evict_one(self) -> Any:
        if self._ghost_hit is not NO_VICTIM:
            return self._replace(self._ghost_hit_in_b2)
        c = self.effective_capacity
        n1, b1 = self._n1, self._b1
        if n1 + len(b1) + 1 > c:
            if b1:
                b1.popitem(last=False)
                return self._replace(False)
            if self._t1:
                key = self._t1.popitem(last=False)[0]
                del self._where[key]
                self._n1 -= 1
                return key
            return self._replace(False)
        if n1 + len(b1) + self._n2 + len(self._b2) >= 2 * c and self._b2:
            self._b2.popitem(last=False)
        return self._replace(False)

    def _replace(self, hit_in_b2: bool) -> Any:
        n1, p = self._n1, self._p
        from_t1 = (n1 > 0 and (n1 > p or (n1 == p and hit_in_b2))) or self._n2 == 0
        if from_t1 and not self._t1:
            from_t1 = False
        elif not from_t1 and not self._t2:
            from_t1 = True
        if not (self._t1 if from_t1 else self._t2):
            return NO_VICTIM
        if from_t1:
            key = self._t1.popitem(last=False)[0]
            self._n1 -= 1
            self._b1[key] = None
        else:
            key = self._t2.popitem(last=False)[0]
            self._n2 -= 1
            self._b2[key] = None
        del self._where[key]
        return key
