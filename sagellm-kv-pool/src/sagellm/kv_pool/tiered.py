"""TieredKVStore: a device pool backed by a host pool and a disk file, with quotas."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from sagellm.core.errors import ConfigError
from sagellm.core.telemetry import KVPoolStats, TierStats
from sagellm.core.types import (
    DTYPE_BYTES,
    AllocationResult,
    KVBlockInfo,
    KVCacheSchema,
    MigrationPlan,
    MigrationResult,
)
from sagellm.kv_pool.allocator import BlockAllocator
from sagellm.kv_pool.config import TieredKVStoreConfig
from sagellm.kv_pool.disk import DiskBlockStore
from sagellm.kv_pool.paged import PagedKVPool
from sagellm.kv_pool.transfer import copy_blocks_between

__all__ = ["TieredKVPoolStats", "TieredKVStore"]

#: Bytes staged per round of a disk transfer: small enough to stay in the last-level cache
#: between the gather that fills the buffer and the write that drains it.
_STAGING_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class TieredKVPoolStats(KVPoolStats):
    """:class:`KVPoolStats` of the device tier plus one :class:`TierStats` per tier.

    Iterating it (or indexing it) walks the per-tier stats, fastest tier first, so it can
    be used where a list of TierStats is expected.
    """

    tiers: tuple[TierStats, ...] = ()  # one entry per tier, fastest first

    def __iter__(self) -> Iterator[TierStats]:
        return iter(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def __getitem__(self, index: int) -> TierStats:
        return self.tiers[index]


@dataclass(slots=True)
class _TierCounters:
    promotions: int = 0
    demotions: int = 0
    bytes_migrated: int = 0
    quota_violations: int = 0


class TieredKVStore:
    """KV blocks in tiers ``device`` > ``host`` > ``disk``, fastest first.

    Implements ``sagellm.core.protocols`` ``KVPool`` (for the device tier), ``TieredKVStore``,
    ``KVMigrator`` and ``KVQuota``. The two faces share method names and are told apart
    by the first argument:

    - KVPool face (what an engine's scheduler and runtime use): ``allocate(n)``,
      ``free(ids)``, ``share``, ``ref_count``, ``copy_blocks``, ``layer_cache``,
      ``block_info(id)`` all act on the device tier;
    - tier face: ``allocate("host", n, tenant)`` returns an :class:`AllocationResult`,
      ``free("disk", ids)``, ``block_info("host", id)``.

    ``make_stats()`` returns :class:`TieredKVPoolStats`: the device tier's KVPoolStats
    whose iteration yields one TierStats per tier. A block keeps its content across
    tiers: :meth:`demote` moves blocks down instead of dropping them, :meth:`promote`
    brings them back (e.g. on a prefix hit); each move reports its measured bandwidth.

    Quotas: ``config.quotas`` maps a tenant to the most blocks it may hold in the tiers of
    ``config.quota_tiers`` (default: the device tier). An allocation or a migration into
    such a tier that would exceed the quota returns ``None`` and counts a violation on
    that tier; a block is charged when allocated and released when its reference count
    reaches 0. Tenants without an entry are not limited.

    Context: ``schema=`` (KVCacheSchema), ``device=`` (torch device string of the device
    tier, default "cpu"). Call :meth:`close` (or use ``with``) to delete the disk file.
    """

    config_class: ClassVar[type[BaseModel]] = TieredKVStoreConfig

    def __init__(
        self,
        config: TieredKVStoreConfig | None = None,
        *,
        schema: KVCacheSchema,
        device: str | torch.device = "cpu",
    ) -> None:
        if config is None:
            config = TieredKVStoreConfig()
        self.config = config
        self._device_pool = PagedKVPool(config.device_config(), schema=schema, device=device)
        tiers: dict[str, BlockAllocator] = {"device": self._device_pool}
        self._pin = torch.cuda.is_available()
        if config.host is not None:
            tiers["host"] = PagedKVPool(
                config.host, schema=schema, device="cpu", tier="host", pin_memory=self._pin
            )
        if config.disk is not None:
            tiers["disk"] = DiskBlockStore(config.disk, block_bytes=schema.bytes_per_block)
        for name in config.quota_tiers:
            if name not in tiers:
                raise ConfigError(
                    f"quota_tiers names {name!r} but that tier is disabled; tiers present: "
                    f"{', '.join(tiers)}"
                )
        self._tiers = tiers
        self._names = tuple(tiers)
        self._level = {name: i for i, name in enumerate(self._names)}
        self._quota_tiers = frozenset(config.quota_tiers)
        self._quotas = dict(config.quotas)
        self._usage: dict[str, int] = {}
        self._counters = {name: _TierCounters() for name in self._names}
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._cuda = self._device_pool.device.type == "cuda"

    # ------------------------------------------------------------------ tiers

    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier names, fastest first."""
        return self._names

    def tier(self, name: str) -> BlockAllocator:
        """The allocator of one tier (a PagedKVPool or a DiskBlockStore)."""
        try:
            return self._tiers[name]
        except KeyError:
            raise ValueError(
                f"unknown tier {name!r}; this store has tiers {', '.join(self._names)}"
            ) from None

    # ------------------------------------------------------------------ KVPool face

    @property
    def schema(self) -> KVCacheSchema:
        """Layout of every block."""
        return self._device_pool.schema

    @property
    def num_blocks(self) -> int:
        """Capacity of the device tier in blocks."""
        return self._device_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free blocks of the device tier."""
        return self._device_pool.num_free_blocks

    @property
    def device_pool(self) -> PagedKVPool:
        """The device tier."""
        return self._device_pool

    def can_allocate(self, num_blocks: int) -> bool:
        """True when ``allocate(num_blocks)`` on the device tier would succeed (capacity)."""
        return self._device_pool.can_allocate(num_blocks)

    def allocate(
        self, tier: str | int | None = None, num_blocks: int | None = None, tenant: str = ""
    ) -> Any:
        """``allocate(n)``: ``n`` device blocks as a list (KVPool), ``None`` when short.

        ``allocate(tier, n, tenant)``: ``n`` blocks of ``tier`` charged to ``tenant`` as
        an :class:`AllocationResult`; ``None`` when the tier is full or the tenant would
        exceed its quota (a counted violation).
        """
        if isinstance(tier, str):
            if num_blocks is None:
                raise TypeError(f"allocate({tier!r}, num_blocks): num_blocks is missing")
            ids = self._allocate(tier, num_blocks, tenant)
            return None if ids is None else AllocationResult(block_ids=tuple(ids), tier=tier)
        if tier is not None:
            if num_blocks is not None:
                raise TypeError("allocate: give the block count once")
            num_blocks = tier
        if num_blocks is None:
            raise TypeError("allocate: num_blocks is missing")
        return self._allocate("device", num_blocks, tenant)

    def free(self, tier: str | Sequence[int], block_ids: Sequence[int] | None = None) -> None:
        """``free(ids)`` on the device tier, or ``free(tier, ids)``; see PagedKVPool.free."""
        if isinstance(tier, str):
            if block_ids is None:
                raise TypeError(f"free({tier!r}, block_ids): block_ids is missing")
            self._free(tier, block_ids)
        else:
            self._free("device", tier)

    def share(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each device block."""
        self._device_pool.share(block_ids)

    def ref_count(self, block_id: int) -> int:
        """Reference count of a device block."""
        return self._device_pool.ref_count(block_id)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks, see :meth:`PagedKVPool.copy_blocks`."""
        self._device_pool.copy_blocks(pairs)

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value storage of one layer of the device tier."""
        return self._device_pool.layer_cache(layer)

    def block_info(self, tier: str | int, block_id: int | None = None) -> KVBlockInfo:
        """``block_info(id)`` of a device block, or ``block_info(tier, id)``."""
        if isinstance(tier, str):
            if block_id is None:
                raise TypeError(f"block_info({tier!r}, block_id): block_id is missing")
            return self.tier(tier).block_info(block_id)
        return self._device_pool.block_info(tier)

    def make_stats(self) -> TieredKVPoolStats:
        """Device KVPoolStats plus per-tier TierStats (iterate it); resets counters."""
        base = self._device_pool.make_stats()
        return TieredKVPoolStats(
            num_blocks=base.num_blocks,
            num_used_blocks=base.num_used_blocks,
            num_free_blocks=base.num_free_blocks,
            utilization=base.utilization,
            fragmentation=base.fragmentation,
            num_allocations=base.num_allocations,
            num_failed_allocations=base.num_failed_allocations,
            num_frees=base.num_frees,
            tiers=tuple(self.make_tier_stats()),
        )

    def make_tier_stats(self) -> list[TierStats]:
        """One TierStats per tier, fastest first; resets the migration/quota counters."""
        out = []
        for name in self._names:
            alloc = self._tiers[name]
            c = self._counters[name]
            out.append(
                TierStats(
                    tier=name,
                    num_blocks=alloc.num_blocks,
                    num_used_blocks=alloc.num_used_blocks,
                    num_promotions=c.promotions,
                    num_demotions=c.demotions,
                    bytes_migrated=c.bytes_migrated,
                    quota_violations=c.quota_violations,
                )
            )
            self._counters[name] = _TierCounters()
        return out

    # ------------------------------------------------------------------ quotas (KVQuota)

    def can_charge(self, tenant: str, num_blocks: int) -> bool:
        """True when ``tenant`` may take ``num_blocks`` more; no side effect."""
        limit = self._quotas.get(tenant)
        return limit is None or self._usage.get(tenant, 0) + num_blocks <= limit

    def charge(self, tenant: str, num_blocks: int) -> bool:
        """Account blocks to ``tenant``; False and a violation (first quota tier) when over."""
        return self._charge(tenant, num_blocks, self._violation_tier())

    def release(self, tenant: str, num_blocks: int) -> None:
        """Return blocks charged to ``tenant``; more than charged raises ValueError."""
        held = self._usage.get(tenant, 0)
        if num_blocks < 0 or num_blocks > held:
            raise ValueError(
                f"release: tenant {tenant!r} holds {held} charged block(s), cannot release "
                f"{num_blocks}"
            )
        if held == num_blocks:
            self._usage.pop(tenant, None)
        else:
            self._usage[tenant] = held - num_blocks

    def usage(self) -> Mapping[str, int]:
        """Blocks charged per tenant (tenants holding none are absent)."""
        return dict(self._usage)

    # ------------------------------------------------------------------ migration

    def plan(
        self,
        src_tier: str,
        dst_tier: str,
        block_ids: Sequence[int],
        keep_source: bool = False,
    ) -> MigrationPlan | None:
        """Allocate destinations in ``dst_tier`` for allocated ``block_ids`` of ``src_tier``.

        The destination blocks take the tenants of their sources. Returns ``None`` when
        ``dst_tier`` lacks free blocks or a tenant would exceed its quota there.
        """
        src = self.tier(src_tier)
        dst = self.tier(dst_tier)
        if src_tier == dst_tier:
            raise ValueError(f"plan: source and destination are both {src_tier!r}")
        ids = src._normalise(block_ids, "plan")
        if len(set(ids)) != len(ids):
            raise ValueError(f"plan: block ids repeat in {ids}; name each block once")
        for b in ids:
            if src._ref[b] == 0:
                raise ValueError(
                    f"plan: block {b} of tier {src_tier!r} is free; only allocated blocks migrate"
                )
        tenants = [src._tenant[b] for b in ids]
        charges: dict[str, int] = {}
        if dst_tier in self._quota_tiers:
            # a move out of another quota tier hands its charge back when the source is
            # released (reference count 1), so only the net growth must fit the quota
            credit: dict[str, int] = {}
            moving = src_tier in self._quota_tiers and not keep_source
            for b, t in zip(ids, tenants):
                charges[t] = charges.get(t, 0) + 1
                if moving and src._ref[b] == 1:
                    credit[t] = credit.get(t, 0) + 1
            for t, n in charges.items():
                if not self.can_charge(t, n - credit.get(t, 0)):
                    self._counters[dst_tier].quota_violations += 1
                    return None
        dst_ids = dst.allocate(len(ids))
        if dst_ids is None:
            return None
        for d, t in zip(dst_ids, tenants):
            dst._tenant[d] = t
        for t, n in charges.items():
            self._usage[t] = self._usage.get(t, 0) + n
        return MigrationPlan(
            src_tier=src_tier,
            dst_tier=dst_tier,
            block_ids=tuple(ids),
            dst_block_ids=tuple(dst_ids),
            keep_source=keep_source,
        )

    def migrate(self, plan: MigrationPlan) -> MigrationResult:
        """Copy the blocks of ``plan``, then free the sources unless ``keep_source``.

        A source block shared by others keeps their references (only one is dropped).
        ``seconds`` covers the copy alone; ``num_bytes`` is blocks times block bytes.
        """
        src = self.tier(plan.src_tier)
        dst = self.tier(plan.dst_tier)
        if len(plan.block_ids) != len(plan.dst_block_ids):
            raise ValueError(
                f"migrate: {len(plan.block_ids)} source blocks but "
                f"{len(plan.dst_block_ids)} destinations; build plans with plan()"
            )
        src_ids = src._normalise(plan.block_ids, "migrate")
        dst_ids = dst._normalise(plan.dst_block_ids, "migrate")
        for alloc, ids, name in ((src, src_ids, plan.src_tier), (dst, dst_ids, plan.dst_tier)):
            for b in ids:
                if alloc._ref[b] == 0:
                    raise ValueError(
                        f"migrate: block {b} of tier {name!r} is free; the plan is stale"
                    )
        start = time.perf_counter()
        self._copy(src, dst, src_ids, dst_ids)
        if self._cuda:
            torch.cuda.synchronize(self._device_pool.device)
        seconds = time.perf_counter() - start
        num_bytes = len(src_ids) * self.schema.bytes_per_block
        dst.touch(dst_ids)
        if not plan.keep_source:
            self._free(plan.src_tier, src_ids)
        n = len(src_ids)
        if self._level[plan.dst_tier] > self._level[plan.src_tier]:
            self._counters[plan.src_tier].demotions += n
        else:
            self._counters[plan.dst_tier].promotions += n
        self._counters[plan.src_tier].bytes_migrated += num_bytes
        self._counters[plan.dst_tier].bytes_migrated += num_bytes
        return MigrationResult(plan=plan, num_bytes=num_bytes, seconds=seconds)

    def demote(
        self,
        block_ids: Sequence[int],
        *,
        src_tier: str = "device",
        dst_tier: str | None = None,
        keep_source: bool = False,
    ) -> MigrationResult | None:
        """Move blocks down instead of dropping them.

        ``dst_tier=None`` tries each slower tier in order and uses the first with room.
        Returns the :class:`MigrationResult` (its ``plan.dst_block_ids`` are the new ids)
        or ``None`` when no tier below has room.
        """
        level = self._level[self.tier(src_tier).tier]
        if dst_tier is not None:
            if self._level[self.tier(dst_tier).tier] <= level:
                raise ValueError(f"demote: {dst_tier!r} is not below {src_tier!r}")
            targets = [dst_tier]
        else:
            targets = list(self._names[level + 1 :])
        for target in targets:
            plan = self.plan(src_tier, target, block_ids, keep_source=keep_source)
            if plan is not None:
                return self.migrate(plan)
        return None

    def promote(
        self,
        block_ids: Sequence[int],
        *,
        src_tier: str,
        dst_tier: str = "device",
        keep_source: bool = False,
    ) -> MigrationResult | None:
        """Bring blocks of ``src_tier`` up to ``dst_tier`` (e.g. on a prefix hit).

        Returns the :class:`MigrationResult` or ``None`` when ``dst_tier`` has no room
        (or a tenant would exceed its quota there).
        """
        if self._level[self.tier(dst_tier).tier] >= self._level[self.tier(src_tier).tier]:
            raise ValueError(f"promote: {dst_tier!r} is not above {src_tier!r}")
        plan = self.plan(src_tier, dst_tier, block_ids, keep_source=keep_source)
        return None if plan is None else self.migrate(plan)

    def defragment(self, tier: str = "device") -> dict[int, int]:
        """Compact the used blocks of ``tier`` to the lowest ids; ``{old: new}`` of moved ones.

        Content, references and tenants move with the blocks; holders of block ids must
        apply the mapping.
        """
        return self.tier(tier).defragment()

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        """Delete the disk tier's file; idempotent."""
        disk = self._tiers.get("disk")
        if isinstance(disk, DiskBlockStore):
            disk.close()

    def __enter__(self) -> TieredKVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _violation_tier(self) -> str:
        for name in self._names:
            if name in self._quota_tiers:
                return name
        return self._names[0]

    def _charge(self, tenant: str, num_blocks: int, tier: str) -> bool:
        if not self.can_charge(tenant, num_blocks):
            self._counters[tier].quota_violations += 1
            return False
        self._usage[tenant] = self._usage.get(tenant, 0) + num_blocks
        return True

    def _allocate(self, tier: str, num_blocks: int, tenant: str) -> list[int] | None:
        alloc = self.tier(tier)
        charged = tier in self._quota_tiers
        if (
            charged
            and isinstance(num_blocks, int)
            and num_blocks > 0
            and not self.can_charge(tenant, num_blocks)
        ):
            self._counters[tier].quota_violations += 1
            return None
        ids = alloc.allocate(num_blocks, tenant)
        if ids is not None and charged and ids:
            self._usage[tenant] = self._usage.get(tenant, 0) + len(ids)
        return ids

    def _free(self, tier: str, block_ids: Sequence[int]) -> None:
        alloc = self.tier(tier)
        alloc.free(block_ids)
        if tier in self._quota_tiers:
            ref = alloc._ref
            owner = alloc._tenant
            usage = self._usage
            for b in set(block_ids):
                if ref[b] == 0:
                    # blocks taken from the tier's allocator directly were never charged
                    t = owner[int(b)]
                    held = usage.get(t, 0)
                    if held > 1:
                        usage[t] = held - 1
                    elif held == 1:
                        del usage[t]

    def _chunk_blocks(self) -> int:
        """Blocks per staging round of a disk transfer (about :data:`_STAGING_BYTES`)."""
        return max(1, _STAGING_BYTES // self.schema.bytes_per_block)

    def _staging_buffer(self, num_blocks: int) -> torch.Tensor:
        """A reusable CPU uint8 buffer of ``num_blocks`` block-major blocks."""
        schema = self.schema
        need = num_blocks * schema.bytes_per_block
        if self._staging.numel() < need:
            size = max(need, 2 * self._staging.numel())
            self._staging = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
        # bytes of one token-head row: its values, then a quantized row's scale
        row_bytes = schema.head_size * DTYPE_BYTES[schema.dtype]
        return self._staging[:need].view(
            num_blocks,
            schema.num_layers,
            2,
            schema.block_size,
            schema.num_kv_heads,
            row_bytes,
        )

    def _copy(
        self, src: BlockAllocator, dst: BlockAllocator, src_ids: list[int], dst_ids: list[int]
    ) -> None:
        if isinstance(src, PagedKVPool) and isinstance(dst, PagedKVPool):
            copy_blocks_between(src.raw_storage, dst.raw_storage, src_ids, dst_ids)
        elif isinstance(src, PagedKVPool) and isinstance(dst, DiskBlockStore):
            # chunks small enough that the staging buffer stays in cache between the
            # gather that fills it and the pwrite that drains it
            step = self._chunk_blocks()
            for i in range(0, len(src_ids), step):
                s, d = src_ids[i : i + step], dst_ids[i : i + step]
                staging = self._staging_buffer(len(s))
                src.gather_blocks(s, staging)
                dst.write_blocks(d, staging.numpy().reshape(len(s), -1))
        elif isinstance(src, DiskBlockStore) and isinstance(dst, PagedKVPool):
            step = self._chunk_blocks()
            for i in range(0, len(src_ids), step):
                s, d = src_ids[i : i + step], dst_ids[i : i + step]
                staging = self._staging_buffer(len(s))
                src.read_blocks(s, staging.numpy().reshape(len(s), -1))
                dst.scatter_blocks(d, staging)
        else:  # pragma: no cover - one disk tier only
            raise ValueError(f"no copy path from {src.tier!r} to {dst.tier!r}")

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={a.num_used_blocks}/{a.num_blocks}" for n, a in self._tiers.items())
        return f"TieredKVStore({parts})"
