"""A prefix index whose evicted blocks go down the KV tiers instead of being dropped.

:class:`TieredPrefixCache` wraps the device prefix index and a tiered KV store (one with
``demote``/``promote``, e.g. ``sagellm.kv_pool.tiered.TieredKVStore``). When the device
index evicts a block, its KV is copied to the next tier with room (host, then disk) and
remembered under the same isolation key and token prefix. A later lookup that continues
past the device match into demoted blocks promotes them: device blocks are allocated, the
KV copied up and inserted into the device index, so the request skips their prefill.

The builder selects it when the KV pool is tiered and a prefix cache is configured.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sagellm.core.protocols import PrefixIndex
from sagellm.core.telemetry import PrefixCacheStats
from sagellm.core.types import PrefixEntry, PrefixMatch

__all__ = [
    "TieredPrefixCache",
    "TieredPrefixCacheConfig",
    "TieredPrefixCacheStats",
    "is_tiered_store",
]


def is_tiered_store(pool: Any) -> bool:
    """True when ``pool`` can demote and promote blocks between tiers."""
    return all(hasattr(pool, name) for name in ("demote", "promote", "tiers", "free"))


class TieredPrefixCacheConfig(BaseModel):
    """No options: the device index and the store are given at construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(slots=True)
class TieredPrefixCacheStats(PrefixCacheStats):
    """The device index's stats plus migrations between tiers since the last snapshot."""

    num_demoted_blocks: int = 0  # counter: device blocks copied down instead of dropped
    num_promoted_blocks: int = 0  # counter: lower-tier blocks copied up on a hit
    num_demoted_bytes: int = 0  # counter
    num_promoted_bytes: int = 0  # counter
    num_dropped_blocks: int = 0  # counter: lower-tier blocks dropped for lack of room
    num_promoted_tokens: int = 0  # counter: prompt tokens served from lower tiers
    num_lower_tier_blocks: int = 0  # gauge: blocks remembered below the device tier
    # gauges: occupancy of the tiers below the device (0 when the tier is absent)
    host_used_blocks: int = 0
    host_blocks: int = 0
    disk_used_blocks: int = 0
    disk_blocks: int = 0


class TieredPrefixCache:
    """Prefix index over a device index and the lower tiers of a tiered KV store.

    Usage::

        index = TieredPrefixCache(RadixPrefixIndex(block_size=16), store)
        scheduler = registry.load("scheduler", "fcfs", {}, kv_pool=store, prefix_index=index,
                                  max_model_len=2048)
    """

    config_class: ClassVar[type[BaseModel]] = TieredPrefixCacheConfig

    def __init__(self, device_index: PrefixIndex, store: Any) -> None:
        if not is_tiered_store(store):
            raise ValueError(
                f"{type(store).__name__} has no demote/promote: use kv_pool 'tiered' for a "
                "tiered prefix cache"
            )
        self.device_index = device_index
        self.store = store
        # device block id -> (isolation key, tokens up to the end of that block)
        self._device_keys: dict[int, tuple[str, tuple[int, ...]]] = {}
        # (isolation key, prefix tokens) -> (tier, block id); least recently used first
        self._lower: OrderedDict[tuple[str, tuple[int, ...]], tuple[str, int]] = OrderedDict()
        self._counters = TieredPrefixCacheStats()

    # ------------------------------------------------------------------ PrefixIndex

    @property
    def block_size(self) -> int:
        """Tokens per block (the device index's)."""
        return self.device_index.block_size

    @property
    def num_cached_blocks(self) -> int:
        """Device blocks the index references (lower-tier blocks are not device blocks)."""
        return self.device_index.num_cached_blocks

    @property
    def num_lower_tier_blocks(self) -> int:
        """Blocks remembered in the tiers below the device."""
        return len(self._lower)

    def lower_tier_entries(self) -> list[tuple[str, tuple[int, ...], str, int]]:
        """``(isolation key, prefix tokens, tier, block id)`` of every demoted block."""
        return [(key, toks, tier, bid) for (key, toks), (tier, bid) in self._lower.items()]

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        """Longest cached prefix; demoted blocks that continue it are promoted first."""
        match = self.device_index.match(token_ids, isolation_key)
        bs = self.block_size
        found: list[tuple[str, int]] = []
        end = match.num_tokens + bs
        while end <= len(token_ids):
            hit = self._lower.get((isolation_key, tuple(token_ids[:end])))
            if hit is None:
                break
            found.append(hit)
            end += bs
        if not found:
            return match
        device_ids = self._promote(found, match)
        if device_ids is None:
            return match
        num_tokens = match.num_tokens + bs * len(device_ids)
        prefix = list(token_ids[:num_tokens])
        taken = set(
            self.device_index.insert(prefix, [*match.block_ids, *device_ids], isolation_key)
        )
        unused = [b for b in device_ids if b not in taken]
        if unused:
            self.store.free(unused)
        for i, b in enumerate(device_ids):
            if b in taken:
                end = match.num_tokens + bs * (i + 1)
                self._device_keys[b] = (isolation_key, tuple(token_ids[:end]))
        for i in range(len(device_ids)):
            end = match.num_tokens + bs * (i + 1)
            self._lower.pop((isolation_key, tuple(token_ids[:end])), None)
        self._counters.num_promoted_tokens += bs * len(device_ids)
        return self.device_index.match(token_ids, isolation_key)

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        """Insert into the device index and remember the prefix of every block it took."""
        taken = self.device_index.insert(token_ids, block_ids, isolation_key)
        if taken:
            bs = self.block_size
            position = {b: i for i, b in enumerate(block_ids)}
            for b in taken:
                end = bs * (position[b] + 1)
                key = (isolation_key, tuple(token_ids[:end]))
                self._device_keys[b] = key
                # The device copy is authoritative again: a stale lower copy is released.
                stale = self._lower.pop(key, None)
                if stale is not None:
                    self.store.free(stale[0], [stale[1]])
        return list(taken)

    def lock(self, match: PrefixMatch) -> None:
        """Protect the matched device blocks from eviction."""
        self.device_index.lock(match)

    def unlock(self, match: PrefixMatch) -> None:
        """Undo one :meth:`lock`."""
        self.device_index.unlock(match)

    def evict(self, num_blocks: int) -> list[int]:
        """Evict from the device index, demoting each block's KV before it is released.

        The returned device blocks still hold their KV; the caller frees them as usual.
        """
        released = self.device_index.evict(num_blocks)
        for b in released:
            key = self._device_keys.pop(b, None)
            if key is not None:
                self._demote(b, key)
        return released

    def entries(self) -> Iterable[PrefixEntry]:
        """The device index's entries."""
        return self.device_index.entries()

    def clear(self) -> list[int]:
        """Drop every unlocked device entry (returned) and every lower-tier block."""
        released = self.device_index.clear()
        for b in released:
            self._device_keys.pop(b, None)
        for tier, bid in self._lower.values():
            self.store.free(tier, [bid])
        self._lower.clear()
        return released

    def make_stats(self) -> TieredPrefixCacheStats:
        """Device-index stats plus tier migrations; resets the counters."""
        base = self.device_index.make_stats()
        out = TieredPrefixCacheStats(
            **{f.name: getattr(base, f.name) for f in fields(PrefixCacheStats)},
            num_demoted_blocks=self._counters.num_demoted_blocks,
            num_promoted_blocks=self._counters.num_promoted_blocks,
            num_demoted_bytes=self._counters.num_demoted_bytes,
            num_promoted_bytes=self._counters.num_promoted_bytes,
            num_dropped_blocks=self._counters.num_dropped_blocks,
            num_promoted_tokens=self._counters.num_promoted_tokens,
            num_lower_tier_blocks=len(self._lower),
            **self._occupancy(),
        )
        self._counters = TieredPrefixCacheStats()
        return out

    # ------------------------------------------------------------------ helpers

    def _occupancy(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tier in ("host", "disk"):
            if tier in self.store.tiers:
                t = self.store.tier(tier)
                out[f"{tier}_used_blocks"] = t.num_blocks - t.num_free_blocks
                out[f"{tier}_blocks"] = t.num_blocks
        return out

    def _demote(self, block_id: int, key: tuple[str, tuple[int, ...]]) -> None:
        # keep_source: the caller frees the device block after this returns.
        result = self.store.demote([block_id], keep_source=True)
        if result is None and self._lower:
            self._drop_oldest()
            result = self.store.demote([block_id], keep_source=True)
        if result is None:
            return
        tier = result.plan.dst_tier
        self._lower[key] = (tier, result.plan.dst_block_ids[0])
        self._counters.num_demoted_blocks += 1
        self._counters.num_demoted_bytes += result.num_bytes

    def _drop_oldest(self) -> None:
        _, (tier, bid) = self._lower.popitem(last=False)
        self.store.free(tier, [bid])
        self._counters.num_dropped_blocks += 1

    def _promote(self, found: list[tuple[str, int]], match: PrefixMatch) -> list[int] | None:
        """Copy ``found`` (in order) to new device blocks; ``None`` when there is no room."""
        need = len(found)
        if not self.store.can_allocate(need):
            # Make room by demoting other cached device blocks; the matched ones are locked.
            if match.hit:
                self.device_index.lock(match)
            try:
                short = need - self.store.num_free_blocks
                released = self.evict(short)
                if released:
                    self.store.free(released)
            finally:
                if match.hit:
                    self.device_index.unlock(match)
            if not self.store.can_allocate(need):
                return None
        device_ids: list[int] = []
        i = 0
        while i < len(found):
            tier = found[i][0]
            j = i
            while j < len(found) and found[j][0] == tier:
                j += 1
            src = [bid for _, bid in found[i:j]]
            result = self.store.promote(src, src_tier=tier, keep_source=False)
            if result is None:
                # The blocks promoted so far still continue the match: keep them.
                return device_ids or None
            device_ids.extend(result.plan.dst_block_ids)
            self._counters.num_promoted_blocks += len(src)
            self._counters.num_promoted_bytes += result.num_bytes
            i = j
        return device_ids

    def __repr__(self) -> str:
        return (
            f"TieredPrefixCache(device={self.device_index!r}, lower_tier_blocks={len(self._lower)})"
        )
