"""SIEVE (anchor: libCacheSim ``Sieve``; Zhang et al., NSDI 2024).

Keys sit in one queue, newest at the head. A hit only sets the key's visited bit. To
evict, the hand walks from where it stopped (first time: the oldest key) towards newer
keys, clearing visited bits, and evicts the first key whose bit is clear; it wraps from
the newest key back to the oldest. The hand then rests on the victim's newer neighbour
(none when the victim was the newest: the next walk starts from the oldest again).

A pinned key leaves the queue as a removal does (the hand steps to its newer
neighbour); its visited bit keeps recording hits. The last unpin inserts it at the head,
like a new key but with its visited bit kept.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from sagellm.eviction._base import NO_VICTIM, PolicyBase
from sagellm.eviction.config import SieveConfig

__all__ = ["SievePolicy"]


class _Node:
    __slots__ = ("key", "newer", "older", "visited")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.newer: _Node | None = None
        self.older: _Node | None = None
        self.visited = False


class SievePolicy(PolicyBase):
    """SIEVE over a doubly linked list: O(1) per access, eviction O(1) amortised."""

    config_class: ClassVar[type[SieveConfig]] = SieveConfig
    name: ClassVar[str] = "sieve"

    def __init__(self, config: SieveConfig | None = None, *, capacity: int | None = None) -> None:
        super().__init__(config, capacity)
        self._nodes: dict[Hashable, _Node] = {}  # every held key, pinned ones included
        self._head: _Node | None = None  # newest
        self._tail: _Node | None = None  # oldest
        self._hand: _Node | None = None

    def queue(self) -> list[Hashable]:
        """Evictable keys, newest first (for inspection and tests)."""
        out = []
        node = self._head
        while node is not None:
            out.append(node.key)
            node = node.older
        return out

    @property
    def hand(self) -> Hashable | None:
        """Key the next eviction starts from (None: the oldest key)."""
        return None if self._hand is None else self._hand.key

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def _link_head(self, node: _Node) -> None:
        node.newer = None
        node.older = self._head
        if self._head is not None:
            self._head.newer = node
        else:
            self._tail = node
        self._head = node

    def _unlink(self, node: _Node) -> None:
        if node is self._hand:
            self._hand = node.newer
        if node.newer is not None:
            node.newer.older = node.older
        else:
            self._head = node.older
        if node.older is not None:
            node.older.newer = node.newer
        else:
            self._tail = node.newer
        node.newer = node.older = None

    def _insert(
        self, key: Hashable, cost: float, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        node = _Node(key)
        self._nodes[key] = node
        self._link_head(node)

    def _access(
        self, key: Hashable, now: float | None, features: Mapping[str, float] | None
    ) -> None:
        self._nodes[key].visited = True

    def _remove(self, key: Hashable, pinned: bool) -> None:
        node = self._nodes.pop(key)
        if not pinned:
            self._unlink(node)

    def _detach(self, key: Hashable) -> None:
        self._unlink(self._nodes[key])

    def _attach(self, key: Hashable) -> None:
        self._link_head(self._nodes[key])

    def _evict_one(self) -> Any:
        tail = self._tail
        if tail is None:
            return NO_VICTIM
        node = self._hand if self._hand is not None else tail
        while node.visited:
            node.visited = False
            node = node.newer if node.newer is not None else tail
        newer = node.newer
        self._unlink(node)
        self._hand = newer
        del self._nodes[node.key]
        return node.key
