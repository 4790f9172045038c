"""What every policy of this package shares: argument checks, pins, counters, capacity.

A policy keeps two kinds of keys: *evictable* ones, in its ordering structure, and
*pinned* ones, taken out of that structure (their metadata stays) so an eviction never
walks over them. The prefix-cache owner pins every interior radix node, so most keys
can be pinned at once; :meth:`PolicyBase.pin` and :meth:`PolicyBase.unpin` are O(1)
and each policy says in its module where a key goes back on its last unpin.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.core.errors import ConfigError
from sagellm.core.telemetry import EvictionStats
from sagellm.core.types import EvictionDecision, PolicyContext
from sagellm.eviction.config import EvictionConfig
from sagellm.eviction.errors import KeyAlreadyHeldError, KeyNotHeldError, NotPinnedError

__all__ = ["NO_VICTIM", "PolicyBase"]

#: what ``_evict_one`` returns when every held key is pinned (keys may be any hashable)
NO_VICTIM: Any = object()


def check_config(config_class: type[EvictionConfig], config: Any) -> Any:
    if config is None:
        return config_class()
    if not isinstance(config, config_class):
        raise ConfigError(
            f"expected a {config_class.__name__} (or None for the defaults), got "
            f"{type(config).__name__}; build the policy with registry.load('eviction', name, "
            "options) or pass its own config class"
        )
    return config


def check_capacity(capacity: Any) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(
            f"capacity must be a positive int (the owner's size in keys) or None, got "
            f"{capacity!r}; leave it out to size the policy by the most keys it has held"
        )
    return capacity


class PolicyBase:
    """Shared half of every policy; subclasses fill the ``_``-prefixed hooks.

    Hooks: ``_insert(key, cost, now, features)``, ``_access(key, now, features)`` (also
    for pinned keys: update metadata only), ``_detach(key)`` (first pin: leave the
    ordering), ``_attach(key)`` (last unpin: rejoin it), ``_remove(key, pinned)``,
    ``_evict_one()`` (an unpinned victim or ``NO_VICTIM``), ``_begin_evict()`` (before a batch).
    """

    config_class: ClassVar[type[EvictionConfig]]
    #: entry-point name, also the ``reason`` of every decision
    name: ClassVar[str]

    def __init__(self, config: Any, capacity: int | None) -> None:
        self.config = check_config(self.config_class, config)
        self._capacity = check_capacity(capacity)
        self._high_water = 0
        self._pins: dict[Hashable, int] = {}
        self._num_inserts = 0
        self._num_accesses = 0
        self._num_evictions = 0

    # ------------------------------------------------------------------ capacity

    @property
    def capacity(self) -> int | None:
        """The owner's size in keys as given at construction (None: not given)."""
        return self._capacity

    @property
    def effective_capacity(self) -> int:
        """Size the policy plans for: ``capacity`` or, when none was given, the most
        keys it has held at once (the high-water mark), at least 1."""
        if self._capacity is not None:
            return self._capacity
        return self._high_water if self._high_water > 0 else 1

    @property
    def num_pinned(self) -> int:
        """Held keys with at least one pin."""
        return len(self._pins)

    # ------------------------------------------------------------------ protocol

    def insert(
        self,
        key: Hashable,
        *,
        cost: float = 1.0,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        """A new key entered the cache (raises KeyAlreadyHeldError when it is held)."""
        if key in self:
            raise KeyAlreadyHeldError(
                f"key {key!r} is already held by the {self.name} policy; call access() for a hit"
            )
        self._num_inserts += 1
        self._insert(key, cost, now, features)
        n = len(self)
        if n > self._high_water:
            self._high_water = n

    def access(
        self,
        key: Hashable,
        *,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        """A held key was used (raises KeyNotHeldError for a key that is not held)."""
        if key not in self:
            raise KeyNotHeldError(
                f"key {key!r} is not held by the {self.name} policy; insert() it first"
            )
        self._num_accesses += 1
        self._access(key, now, features)

    def remove(self, key: Hashable) -> None:
        """The owner dropped ``key`` itself; pins go with it. Unknown keys are ignored."""
        if key not in self:
            return
        pinned = self._pins.pop(key, 0) > 0
        self._remove(key, pinned)

    def pin(self, key: Hashable) -> None:
        """Exclude a held key from eviction; pins nest (O(1))."""
        if key not in self:
            raise KeyNotHeldError(
                f"cannot pin {key!r}: the {self.name} policy does not hold it; insert() it first"
            )
        count = self._pins.get(key, 0)
        if count == 0:
            self._detach(key)
        self._pins[key] = count + 1

    def unpin(self, key: Hashable) -> None:
        """Undo one :meth:`pin`; the last one makes the key evictable again (O(1))."""
        count = self._pins.get(key, 0)
        if count == 0:
            raise NotPinnedError(
                f"cannot unpin {key!r}: it is not pinned in the {self.name} policy "
                "(unpin was called more often than pin)"
            )
        if count == 1:
            del self._pins[key]
            self._attach(key)
        else:
            self._pins[key] = count - 1

    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        """Remove and return up to ``num`` unpinned keys, best victim first."""
        if num < 0:
            raise ValueError(f"evict() needs a non-negative number of keys, got {num}")
        victims = []
        if num:
            self._begin_evict()
            evict_one = self._evict_one
            for _ in range(num):
                key = evict_one()
                if key is NO_VICTIM:
                    break
                victims.append(key)
            self._num_evictions += len(victims)
        return EvictionDecision(victims=tuple(victims), reason=self.name)

    def make_stats(self) -> EvictionStats:
        """Counters since the previous call (then reset) and the number of held keys."""
        stats = EvictionStats(
            num_inserts=self._num_inserts,
            num_accesses=self._num_accesses,
            num_evictions=self._num_evictions,
            num_entries=len(self),
        )
        self._num_inserts = self._num_accesses = self._num_evictions = 0
        return stats

    def __contains__(self, key: object) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(held={len(self)}, pinned={len(self._pins)}, "
            f"capacity={self._capacity})"
        )

    # ------------------------------------------------------------------ hooks

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        raise NotImplementedError

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        raise NotImplementedError

    def _remove(self, key: Hashable, pinned: bool) -> None:
        raise NotImplementedError

    def _detach(self, key: Hashable) -> None:
        raise NotImplementedError

    def _attach(self, key: Hashable) -> None:
        raise NotImplementedError

    def _evict_one(self) -> Any:
        raise NotImplementedError

    def _begin_evict(self) -> None:
        """Called once before the victims of one :meth:`evict` call are chosen."""
