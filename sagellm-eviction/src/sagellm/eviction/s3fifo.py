"""S3-FIFO (anchor: libCacheSim ``S3FIFO``; Yang et al., SOSP 2023).

Three FIFOs: *small* (``small_size_ratio`` of the capacity), *main* (the rest) and a
*ghost* of keys only (``ghost_size_ratio`` of the capacity, oldest dropped first).
A new key enters small, or main when it is in the ghost (the ghost entry is consumed).
A hit adds one to the key's counter. To evict: from main when main holds more than its
share or small is empty, else from small.

- Small: the oldest key moves to main (counter reset to 0) when its counter reached
  ``move_to_main_threshold``, and the scan goes on; the first key below the threshold
  is the victim and its key enters the ghost. When small empties without a victim,
  main evicts.
- Main (a CLOCK with a 2-bit counter): the oldest key with a counter of at least 1 goes
  back to the tail with ``min(counter, 3) - 1``; the first one at 0 is the victim.

Until the first eviction, a new key enters main once small holds its share (the cache
fills up without churning small). Sizes use ``capacity``, or without one the high-water
mark of held keys: ``small = int(c * small_size_ratio)``, ``main = c - small``,
``ghost = int(c * ghost_size_ratio)``, re-derived as the mark grows (so without a
capacity the fill-up phase differs from libCacheSim's, which knows its size up front).
libCacheSim admits nothing while ``small`` is below 2 keys (capacities under 20 with
the defaults); here small keeps at least its share, even a share of 0 or 1.

Ghost hits and the get loop: libCacheSim looks the missed key up (consuming its ghost
entry) *before* it evicts to make room. Here the owner asks ``key in policy`` first, so
:meth:`S3FIFOPolicy.__contains__` remembers the last ghost key it was asked about and
the next :meth:`evict` consumes that ghost entry first; the key then enters main on its
insert. An owner that never asks gets the same admission, decided at insert.

A pinned key leaves its FIFO (still counted in that FIFO's occupancy) and keeps
counting hits; the last unpin appends it to the tail of the FIFO it was in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import S3FIFOConfig

__all__ = ["S3FIFOPolicy"]

_SMALL, _MAIN = 0, 1


class S3FIFOPolicy(PolicyBase):
    """S3-FIFO over ordered dicts: O(1) per access, eviction O(1) amortised."""

    config_class: ClassVar[type[S3FIFOConfig]] = S3FIFOConfig
    name: ClassVar[str] = "s3fifo"

    def __init__(self, config: S3FIFOConfig | None = None, *, capacity: int | None = None) -> None:
        super().__init__(config, capacity)
        self._small: OrderedDict[Hashable, None] = OrderedDict()  # oldest first, unpinned
        self._main: OrderedDict[Hashable, None] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._where: dict[Hashable, int] = {}  # every held key -> _SMALL or _MAIN
        self._freq: dict[Hashable, int] = {}
        self._num_pinned = [0, 0]  # pinned keys per FIFO
        self._threshold = self.config.move_to_main_threshold
        self._probe: Any = NO_VICTIM  # ghost key last asked about by __contains__
        self._admit: Any = NO_VICTIM  # ghost key consumed by evict, enters main on insert
        self._has_evicted = False

    # ------------------------------------------------------------------ inspection

    def sizes(self) -> tuple[int, int, int]:
        """Target sizes (small, main, ghost) at the current capacity."""
        c = self.effective_capacity
        small = int(c * self.config.small_size_ratio)
        return small, c - small, int(c * self.config.ghost_size_ratio)

    def small_keys(self) -> list[Hashable]:
        """Evictable keys of small, oldest first."""
        return list(self._small)

    def main_keys(self) -> list[Hashable]:
        """Evictable keys of main, oldest first."""
        return list(self._main)

    def ghost_keys(self) -> list[Hashable]:
        """Keys of the ghost, oldest first."""
        return list(self._ghost)

    def frequency(self, key: Hashable) -> int:
        """The hit counter of a held key."""
        return self._freq[key]

    def __contains__(self, key: object) -> bool:
        if key in self._where:
            return True
        if key in self._ghost:
            self._probe = key
        return False

    def __len__(self) -> int:
        return len(self._where)

    # ------------------------------------------------------------------ hooks

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        self._probe = NO_VICTIM
        if self._admit == key:
            to_main = True
        elif key in self._ghost:
            del self._ghost[key]
            to_main = True
        elif not self._has_evicted:
            # warm-up: until the first eviction, small holds only its share and the
            # overflow fills main directly
            small_size = int(self.effective_capacity * self.config.small_size_ratio)
            to_main = len(self._small) + self._num_pinned[_SMALL] >= small_size
        else:
            to_main = False
        self._admit = NO_VICTIM
        self._freq[key] = 0
        if to_main:
            self._where[key] = _MAIN
            self._main[key] = None
        else:
            self._where[key] = _SMALL
            self._small[key] = None

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        self._freq[key] += 1

    def _remove(self, key: Hashable, pinned: bool) -> None:
        where = self._where.pop(key)
        del self._freq[key]
        if pinned:
            self._num_pinned[where] -= 1
        elif where == _SMALL:
            del self._small[key]
        else:
            del self._main[key]

    def _detach(self, key: Hashable) -> None:
        where = self._where[key]
        self._num_pinned[where] += 1
        if where == _SMALL:
            del self._small[key]
        else:
            del self._main[key]

    def _attach(self, key: Hashable) -> None:
        where = self._where[key]
        self._num_pinned[where] -= 1
        if where == _SMALL:
            self._small[key] = None
        else:
            self._main[key] = None

    def _begin_evict(self) -> None:
        self._has_evicted = True
        probe = self._probe
        if probe is not NO_VICTIM:
            self._probe = NO_VICTIM
            if probe in self._ghost and probe not in self._where:
                del self._ghost[probe]
                self._admit = probe

    def _evict_one(self) -> Any:
        small, main = self._small, self._main
        c = self.effective_capacity
        main_size = c - int(c * self.config.small_size_ratio)
        while True:
            main_full = len(main) + self._num_pinned[_MAIN] > main_size
            if main and (main_full or not small):
                return self._evict_main()
            if small:
                key = self._evict_small()
                if key is not NO_VICTIM:
                    return key
                continue  # every small key moved to main: evict from main
            return NO_VICTIM

    def _evict_small(self) -> Any:
        small, main, freq, threshold = self._small, self._main, self._freq, self._threshold
        while small:
            key = small.popitem(last=False)[0]
            if freq[key] >= threshold:
                main[key] = None
                self._where[key] = _MAIN
                freq[key] = 0
                continue
            del self._where[key]
            del freq[key]
            ghost_size = int(self.effective_capacity * self.config.ghost_size_ratio)
            if ghost_size > 0 and key not in self._ghost:
                ghost = self._ghost
                while len(ghost) >= ghost_size:
                    ghost.popitem(last=False)
                ghost[key] = None
            return key
        return NO_VICTIM

    def _evict_main(self) -> Any:
        main, freq = self._main, self._freq
        while True:
            key = next(iter(main))
            f = freq[key]
            if f >= 1:
                main.move_to_end(key)
                freq[key] = (f if f < 3 else 3) - 1
                continue
            del main[key]
            del self._where[key]
            del freq[key]
            return key
