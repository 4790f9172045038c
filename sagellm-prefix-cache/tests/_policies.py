"""A small EvictionPolicy implementation that records what it is told."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sagellm.core.telemetry import EvictionStats
from sagellm.core.types import EvictionDecision, PolicyContext


class FifoPolicyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FifoPolicy:
    """First in, first out among unpinned keys; accesses do not reorder (unlike LRU)."""

    config_class: ClassVar[type[BaseModel]] = FifoPolicyConfig

    def __init__(self, config: FifoPolicyConfig | None = None) -> None:
        self.order: list[Hashable] = []
        self.pins: dict[Hashable, int] = {}
        self.calls: list[tuple[str, Any]] = []
        self.features: dict[Hashable, Mapping[str, float] | None] = {}  # last given per key

    def insert(
        self,
        key: Hashable,
        *,
        cost: float = 1.0,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        assert key not in self.order, f"{key} inserted twice"
        self.order.append(key)
        self.features[key] = features
        self.calls.append(("insert", key))

    def access(
        self,
        key: Hashable,
        *,
        now: float | None = None,
        features: Mapping[str, float] | None = None,
    ) -> None:
        assert key in self.order, f"access of unknown key {key}"
        self.features[key] = features
        self.calls.append(("access", key))

    def remove(self, key: Hashable) -> None:
        self.order.remove(key)
        self.pins.pop(key, None)
        self.calls.append(("remove", key))

    def pin(self, key: Hashable) -> None:
        assert key in self.order
        self.pins[key] = self.pins.get(key, 0) + 1
        self.calls.append(("pin", key))

    def unpin(self, key: Hashable) -> None:
        assert self.pins.get(key, 0) > 0, f"unpin of unpinned key {key}"
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]
        self.calls.append(("unpin", key))

    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        victims = [k for k in self.order if k not in self.pins][:num]
        for k in victims:
            self.order.remove(k)
        self.calls.append(("evict", tuple(victims)))
        return EvictionDecision(tuple(victims), "fifo")

    def __contains__(self, key: object) -> bool:
        return key in self.order

    def __len__(self) -> int:
        return len(self.order)

    def make_stats(self) -> EvictionStats:
        return EvictionStats(num_entries=len(self.order))
