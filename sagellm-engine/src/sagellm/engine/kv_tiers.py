"""A prefix index whose evicted blocks go down the KV tiers instead of being dropped.

:class:`TieredPrefixCache` wraps the device prefix index and a tiered KV store (one with
``demote``/``promote``, e.g. ``sagellm.kv_pool.tiered.TieredKVStore``). When the device
index evicts a block, its KV is copied to the next tier with room (host, then disk) and
remembered under the same isolation key and token prefix. A later lookup that continues
past the device match into demoted blocks promotes them: device blocks are allocated, the
KV copied up and inserted into the device index, so the request skips their prefill.

Blocks are known below the device by a hash chain, as in vLLM's automatic prefix
caching: a block's key hashes its parent's key and its own tokens (the isolation key seeds
the chain), and an entry stores its parent's key and its tokens, which are compared on
every hit, so a hash collision is a miss, never wrong KV. A lookup costs one hash per
block, linear in the prompt. Which lower-tier block is dropped when the tiers are full is
decided by an eviction policy (the engine's ``eviction`` slot, a second instance sized for
the lower tiers) or, without one, least recently demoted first.

The builder selects it when the KV pool is tiered and a prefix cache is configured.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sagellm.core.protocols import EvictionPolicy, PrefixIndex
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


@dataclass(frozen=True, slots=True)
class _BlockKey:
    """Where one full block sits in its sequence: the link of the hash chain it is."""

    chain_hash: int  # hash of (parent's chain_hash, tokens)
    parent_hash: int  # the previous block's chain_hash (the chain's seed for the first)
    tokens: tuple[int, ...]  # this block's tokens
    end: int  # tokens from the sequence start to this block's end
    isolation_key: str


def _chain_seed(isolation_key: str) -> int:
    return hash(("sagellm.kv_tiers", isolation_key))


def _block_keys(
    token_ids: Sequence[int], block_size: int, isolation_key: str, num_blocks: int
) -> list[_BlockKey]:
    """Keys of the first ``num_blocks`` full blocks of ``token_ids``."""
    h = _chain_seed(isolation_key)
    out: list[_BlockKey] = []
    for i in range(num_blocks):
        end = (i + 1) * block_size
        tokens = tuple(token_ids[end - block_size : end])
        parent, h = h, hash((h, tokens))
        out.append(_BlockKey(h, parent, tokens, end, isolation_key))
    return out


class TieredPrefixCache:
    """Prefix index over a device index and the lower tiers of a tiered KV store.

    Usage::

        index = TieredPrefixCache(RadixPrefixIndex(block_size=16), store)
        scheduler = registry.load("scheduler", "fcfs", {}, kv_pool=store, prefix_index=index,
                                  max_model_len=2048)

    ``lower_policy`` orders the lower-tier blocks for dropping (keys are chain hashes);
    without one the least recently demoted block goes first.
    """

    config_class: ClassVar[type[BaseModel]] = TieredPrefixCacheConfig

    def __init__(
        self, device_index: PrefixIndex, store: Any, lower_policy: EvictionPolicy | None = None
    ) -> None:
        if not is_tiered_store(store):
            raise ValueError(
                f"{type(store).__name__} has no demote/promote: use kv_pool 'tiered' for a "
                "tiered prefix cache"
            )
        self.device_index = device_index
        self.store = store
        self.lower_policy = lower_policy
        # device block id -> its place in the chain (for demotion when it is evicted)
        self._device_keys: dict[int, _BlockKey] = {}
        # chain hash -> (key, tier, block id); least recently demoted first
        self._lower: OrderedDict[int, tuple[_BlockKey, str, int]] = OrderedDict()
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

    def lower_tier_entries(self) -> list[tuple[str, int, tuple[int, ...], str, int]]:
        """``(isolation key, prefix length, block tokens, tier, block id)`` of every
        demoted block, least recently demoted first."""
        return [
            (k.isolation_key, k.end, k.tokens, tier, bid) for k, tier, bid in self._lower.values()
        ]

    def _lower_hit(self, key: _BlockKey) -> tuple[_BlockKey, str, int] | None:
        entry = self._lower.get(key.chain_hash)
        # the stored tokens, parent link and isolation key rule out a hash collision
        if entry is None or entry[0] != key:
            return None
        return entry

    def match(self, token_ids: Sequence[int], isolation_key: str = "") -> PrefixMatch:
        """Longest cached prefix; demoted blocks that continue it are promoted first."""
        match = self.device_index.match(token_ids, isolation_key)
        bs = self.block_size
        num_full = len(token_ids) // bs
        start = match.num_tokens // bs
        if not self._lower or start >= num_full:
            return match
        keys = _block_keys(token_ids, bs, isolation_key, num_full)
        found: list[tuple[_BlockKey, str, int]] = []
        for key in keys[start:]:
            hit = self._lower_hit(key)
            if hit is None:
                break
            found.append(hit)
        if not found:
            return match
        device_ids = self._promote([(tier, bid) for _, tier, bid in found], match)
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
        for (key, _, _), b in zip(found, device_ids):
            if b in taken:
                self._device_keys[b] = key
            self._forget_lower(key.chain_hash)
        self._counters.num_promoted_tokens += bs * len(device_ids)
        return self.device_index.match(token_ids, isolation_key)

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], isolation_key: str = ""
    ) -> list[int]:
        """Insert into the device index and remember the chain key of every block it took."""
        taken = self.device_index.insert(token_ids, block_ids, isolation_key)
        if taken:
            position = {b: i for i, b in enumerate(block_ids)}
            keys = _block_keys(
                token_ids, self.block_size, isolation_key, 1 + max(position[b] for b in taken)
            )
            for b in taken:
                key = keys[position[b]]
                self._device_keys[b] = key
                # The device copy is authoritative again: a stale lower copy is released.
                stale = self._lower_hit(key)
                if stale is not None:
                    self._forget_lower(key.chain_hash)
                    self.store.free(stale[1], [stale[2]])
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
        for chain_hash, (_, tier, bid) in list(self._lower.items()):
            self._forget_lower(chain_hash)
            self.store.free(tier, [bid])
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

    def _demote(self, block_id: int, key: _BlockKey) -> None:
        # keep_source: the caller frees the device block after this returns.
        result = self.store.demote([block_id], keep_source=True)
        if result is None and self._lower:
            self._drop_one()
            result = self.store.demote([block_id], keep_source=True)
        if result is None:
            return
        assert key.chain_hash not in self._lower, "a block is demoted while its copy is below"
        self._lower[key.chain_hash] = (key, result.plan.dst_tier, result.plan.dst_block_ids[0])
        if self.lower_policy is not None:
            self.lower_policy.insert(
                key.chain_hash,
                features={"prefix_depth": float(key.end)},
            )
        self._counters.num_demoted_blocks += 1
        self._counters.num_demoted_bytes += result.num_bytes

    def _forget_lower(self, chain_hash: int) -> None:
        del self._lower[chain_hash]
        if self.lower_policy is not None:
            self.lower_policy.remove(chain_hash)

    def _drop_one(self) -> None:
        """Free the lower-tier block the policy (or demotion order) gives up first."""
        if self.lower_policy is not None:
            victims = self.lower_policy.evict(1).victims
            assert victims, "the lower-tier policy holds no key although blocks are demoted"
            _, tier, bid = self._lower.pop(victims[0])
        else:
            _, (_, tier, bid) = self._lower.popitem(last=False)
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
