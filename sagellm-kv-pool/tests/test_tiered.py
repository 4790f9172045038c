"""TieredKVStore: both faces, migrations with content, quotas, defragment, disk file, stats."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from sagellm.core import registry
from sagellm.core.errors import ConfigError
from sagellm.core.protocols import KVMigrator, KVPool, KVQuota
from sagellm.core.protocols import TieredKVStore as TieredKVStoreProtocol
from sagellm.core.telemetry import KVPoolStats, TierStats
from sagellm.core.types import AllocationResult, KVCacheSchema, MigrationPlan
from sagellm.kv_pool import PagedKVPool
from sagellm.kv_pool.config import DiskTierConfig, PagedKVPoolConfig, TieredKVStoreConfig
from sagellm.kv_pool.disk import DiskBlockStore
from sagellm.kv_pool.tiered import TieredKVPoolStats, TieredKVStore


def make_store(
    schema: KVCacheSchema,
    tmp_path: Path,
    *,
    device: int = 8,
    host: int | None = 6,
    disk: int | None = 4,
    **options: object,
) -> TieredKVStore:
    config = TieredKVStoreConfig(
        device=PagedKVPoolConfig(num_blocks=device),
        host=None if host is None else PagedKVPoolConfig(num_blocks=host),
        disk=None if disk is None else DiskTierConfig(num_blocks=disk, directory=str(tmp_path)),
        **options,
    )
    return TieredKVStore(config, schema=schema, device="cpu")


@pytest.fixture
def store(schema: KVCacheSchema, tmp_path: Path) -> Iterator[TieredKVStore]:
    with make_store(schema, tmp_path, quotas={"a": 3}) as s:
        yield s


def fill(store: TieredKVStore, block_ids: list[int], seed: int) -> torch.Tensor:
    """Write random bytes into device blocks (values and any scales); return a copy."""
    raw = store.device_pool.raw_storage
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, raw[:, :, block_ids].shape, generator=gen, dtype=torch.uint8)
    raw[:, :, block_ids] = data
    return data.clone()


def device_content(store: TieredKVStore, block_ids: list[int]) -> torch.Tensor:
    """The bytes of device blocks (compared as bytes: float8 patterns may be NaN)."""
    return store.device_pool.raw_storage[:, :, block_ids].clone()


# ---------------------------------------------------------------- protocols, registry


def test_implements_every_protocol(store: TieredKVStore) -> None:
    for proto in (KVPool, TieredKVStoreProtocol, KVMigrator, KVQuota):
        assert isinstance(store, proto), proto.__name__
    assert store.tiers == ("device", "host", "disk")
    assert TieredKVStore.config_class is TieredKVStoreConfig


def test_registered_as_tiered(schema: KVCacheSchema, tmp_path: Path) -> None:
    registry.reset_cache()
    options = {
        "device": {"num_blocks": 4},
        "host": {"num_blocks": 2},
        "disk": {"num_blocks": 2, "directory": str(tmp_path)},
    }
    store = registry.load("kv_pool", "tiered", options, schema=schema, device="cpu")
    try:
        assert type(store) is TieredKVStore
        assert (store.num_blocks, store.tier("host").num_blocks) == (4, 2)
    finally:
        store.close()


# ---------------------------------------------------------------- KVPool face


def test_kv_pool_face_acts_on_the_device_tier(store: TieredKVStore) -> None:
    assert store.allocate(3) == [0, 1, 2]
    assert store.allocate(num_blocks=2) == [3, 4]
    assert store.num_free_blocks == 3
    assert store.can_allocate(3) and not store.can_allocate(4)
    assert store.allocate(4) is None
    store.share([1])
    store.free([1, 2])
    assert [store.ref_count(b) for b in range(5)] == [1, 1, 0, 1, 1]
    assert store.allocate(1) == [2]
    k, v = store.layer_cache(1)
    assert k.shape == v.shape == (8, 4, 2, 4)
    info = store.block_info(0)
    assert (info.tier, info.block_id, info.ref_count) == ("device", 0, 1)
    with pytest.raises(ValueError, match=r"free: block 7 is already free"):
        store.free([7])


def test_copy_blocks_on_the_device_tier(store: TieredKVStore) -> None:
    ids = store.allocate(4)
    data = fill(store, ids, seed=1)
    store.copy_blocks([(0, 3)])
    assert torch.equal(device_content(store, [3])[:, :, 0], data[:, :, 0])


# ---------------------------------------------------------------- tier face


def test_tier_face_allocate_free_and_info(store: TieredKVStore) -> None:
    assert store.allocate("host", 2, tenant="b") == AllocationResult(block_ids=(0, 1), tier="host")
    assert store.allocate("disk", 5) is None
    assert store.allocate("disk", 4) == AllocationResult(block_ids=(0, 1, 2, 3), tier="disk")
    info = store.block_info("host", 1)
    assert (info.tier, info.tenant_id, info.ref_count) == ("host", "b", 1)
    assert info.size_bytes == store.schema.bytes_per_block
    store.free("host", [0])
    assert store.allocate("host", 1) == AllocationResult(block_ids=(0,), tier="host")
    with pytest.raises(
        ValueError, match=r"unknown tier 'gpu'; this store has tiers device, host, disk"
    ):
        store.allocate("gpu", 1)
    with pytest.raises(
        ValueError, match=r"free: unknown block id 4; this disk pool has blocks 0..3"
    ):
        store.free("disk", [4])


# ---------------------------------------------------------------- migration


@pytest.mark.parametrize(
    ("dtype", "scale_bytes"),
    [
        ("float32", 0),
        ("bfloat16", 0),
        ("int8", 2),
        ("float8_e4m3fn", 2),
        ("float8_e5m2", 2),
    ],
)
def test_round_trip_device_host_disk_device_keeps_content(
    dtype: str, scale_bytes: int, tmp_path: Path
) -> None:
    schema = KVCacheSchema(
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        block_size=4,
        dtype=dtype,
        scale_bytes=scale_bytes,
    )
    # 2 layers x (K, V) x 4 tokens x 2 heads x (4 values + a quantized row's 2 scale bytes)
    element = {"float32": 4, "bfloat16": 2}.get(dtype, 1)
    assert schema.bytes_per_block == 2 * 2 * 4 * 2 * (4 * element + scale_bytes)
    with make_store(schema, tmp_path) as store:
        ids = store.allocate(5)
        data = fill(store, ids, seed=2)
        moved = [ids[4], ids[1], ids[2]]  # blocks 4, 1, 2
        expected = data[:, :, [4, 1, 2]]

        down = store.demote(moved)
        assert down is not None
        assert down.plan == MigrationPlan("device", "host", (4, 1, 2), (0, 1, 2))
        assert down.num_bytes == 3 * schema.bytes_per_block
        assert down.seconds > 0
        assert [store.ref_count(b) for b in range(5)] == [1, 0, 0, 1, 0]

        deeper = store.demote([0, 1, 2], src_tier="host")
        assert deeper is not None
        assert deeper.plan == MigrationPlan("host", "disk", (0, 1, 2), (0, 1, 2))
        assert store.tier("host").num_used_blocks == 0

        store.device_pool.storage.zero_()  # the device copy is gone for sure
        up = store.promote([2, 0, 1], src_tier="disk")
        assert up is not None
        # device blocks 4, 1, 2 were freed in that order: reused first, in that order
        assert up.plan == MigrationPlan("disk", "device", (2, 0, 1), (4, 1, 2))
        assert torch.equal(device_content(store, [4, 1, 2]), expected[:, :, [2, 0, 1]])
        assert store.tier("disk").num_used_blocks == 0


def test_demote_falls_through_to_disk_and_returns_none_when_all_full(
    store: TieredKVStore,
) -> None:
    store.allocate("host", 5)
    ids = store.allocate(6)
    data = fill(store, ids, seed=3)
    r = store.demote([0, 1])
    assert r is not None and r.plan.dst_tier == "disk" and r.plan.dst_block_ids == (0, 1)
    r = store.demote([2])
    assert r is not None and r.plan.dst_tier == "host" and r.plan.dst_block_ids == (5,)
    r = store.demote([3, 4, 5])
    assert r is None
    assert [store.ref_count(b) for b in range(6)] == [0, 0, 0, 1, 1, 1]
    back = store.promote([1, 0], src_tier="disk")
    assert back is not None and back.plan.dst_block_ids == (2, 0)
    assert torch.equal(device_content(store, [2, 0]), data[:, :, [1, 0]])


def test_keep_source_copies_and_shared_sources_keep_their_other_references(
    store: TieredKVStore,
) -> None:
    ids = store.allocate(2)
    data = fill(store, ids, seed=4)
    copy = store.demote([0], keep_source=True)
    assert copy is not None and copy.plan.keep_source
    assert store.ref_count(0) == 1
    store.share([1])
    moved = store.demote([1])
    assert moved is not None
    assert store.ref_count(1) == 1  # one of two references dropped
    store.device_pool.storage.zero_()
    back = store.promote([0, 1], src_tier="host", dst_tier="device")
    assert back is not None and back.plan.dst_block_ids == (2, 3)
    assert torch.equal(device_content(store, [2, 3]), data)


def test_plan_and_migrate_errors(store: TieredKVStore) -> None:
    store.allocate(2)
    with pytest.raises(ValueError, match=r"plan: block 5 of tier 'device' is free"):
        store.plan("device", "host", [0, 5])
    with pytest.raises(ValueError, match=r"plan: source and destination are both 'host'"):
        store.plan("host", "host", [0])
    with pytest.raises(ValueError, match=r"plan: block ids repeat"):
        store.plan("device", "host", [0, 0])
    with pytest.raises(ValueError, match=r"demote: 'device' is not below 'host'"):
        store.demote([0], src_tier="host", dst_tier="device")
    with pytest.raises(ValueError, match=r"promote: 'disk' is not above 'device'"):
        store.promote([0], src_tier="device", dst_tier="disk")
    plan = store.plan("device", "host", [0])
    assert plan is not None
    store.migrate(plan)
    with pytest.raises(
        ValueError, match=r"migrate: block 0 of tier 'device' is free; the plan is stale"
    ):
        store.migrate(plan)
    bad = MigrationPlan("device", "host", (1,), ())
    with pytest.raises(ValueError, match=r"1 source blocks but 0 destinations"):
        store.migrate(bad)
    assert store.tier("host").num_used_blocks == 1


# ---------------------------------------------------------------- quotas


def test_quota_limits_device_blocks_and_counts_violations(store: TieredKVStore) -> None:
    assert store.allocate(2, tenant="a") == [0, 1]
    assert store.can_charge("a", 1) and not store.can_charge("a", 2)
    assert store.allocate(2, tenant="a") is None
    assert store.allocate("device", 2, tenant="a") is None
    assert store.allocate(5, tenant="b") == [2, 3, 4, 5, 6]  # no quota for b
    assert store.usage() == {"a": 2, "b": 5}
    # host is not a quota tier by default
    assert store.allocate("host", 5, tenant="a") is not None
    store.free([0])
    assert store.usage() == {"a": 1, "b": 5}
    assert store.allocate(2, tenant="a") == [0, 7]
    stats = {t.tier: t for t in store.make_stats()}
    assert stats["device"].quota_violations == 2
    assert stats["host"].quota_violations == 0
    assert {t.tier: t.quota_violations for t in store.make_stats()}["device"] == 0


def test_promotion_over_quota_is_refused(store: TieredKVStore) -> None:
    ids = store.allocate(3, tenant="a")
    r = store.demote(ids[:2])
    assert r is not None
    assert store.usage() == {"a": 1}
    assert store.block_info("host", 0).tenant_id == "a"
    store.allocate(2, tenant="a")  # a holds 3 device blocks again
    assert store.promote([0], src_tier="host") is None
    assert [t.quota_violations for t in store.make_tier_stats()] == [1, 0, 0]
    assert store.tier("host").num_used_blocks == 2  # nothing moved
    store.free([0])
    r = store.promote([0], src_tier="host")
    assert r is not None and r.plan.dst_block_ids == (0,)
    assert store.block_info(0).tenant_id == "a"
    assert store.usage() == {"a": 3}


def test_kv_quota_methods(store: TieredKVStore) -> None:
    assert store.charge("a", 3) is True
    assert store.charge("a", 1) is False
    assert store.charge("zed", 100) is True
    assert store.usage() == {"a": 3, "zed": 100}
    store.release("a", 2)
    assert store.usage() == {"a": 1, "zed": 100}
    with pytest.raises(
        ValueError, match=r"release: tenant 'a' holds 1 charged block\(s\), cannot release 2"
    ):
        store.release("a", 2)
    store.release("a", 1)
    assert store.usage() == {"zed": 100}
    assert store.make_tier_stats()[0].quota_violations == 1


# ---------------------------------------------------------------- defragment


def test_defragment_device_tier_mapping_and_content(store: TieredKVStore) -> None:
    ids = store.allocate(6, tenant="b")
    data = fill(store, ids, seed=5)
    store.free([0, 2])  # used: 1, 3, 4, 5
    assert store.defragment() == {4: 0, 5: 2}
    assert torch.equal(device_content(store, [0, 1, 2, 3]), data[:, :, [4, 1, 5, 3]])
    assert store.block_info(2).tenant_id == "b"
    assert store.allocate(2) == [4, 5]
    assert store.usage() == {"b": 4, "": 2}


def test_defragment_disk_tier_mapping_and_content(store: TieredKVStore) -> None:
    ids = store.allocate(4)
    data = fill(store, ids, seed=6)
    r = store.demote(ids, dst_tier="disk")
    assert r is not None and r.plan.dst_block_ids == (0, 1, 2, 3)
    store.free("disk", [0, 1])
    assert store.defragment("disk") == {2: 0, 3: 1}
    back = store.promote([0, 1], src_tier="disk")
    assert back is not None
    assert torch.equal(device_content(store, list(back.plan.dst_block_ids)), data[:, :, [2, 3]])


# ---------------------------------------------------------------- stats


def test_stats_are_device_pool_stats_with_tiers(store: TieredKVStore) -> None:
    ids = store.allocate(4)
    store.demote(ids[:2])
    store.demote([0], src_tier="host")
    store.promote([0], src_tier="disk")
    stats = store.make_stats()
    assert isinstance(stats, TieredKVPoolStats) and isinstance(stats, KVPoolStats)
    assert (stats.num_blocks, stats.num_used_blocks, stats.num_allocations) == (8, 3, 2)
    bpb = store.schema.bytes_per_block
    assert list(stats) == [
        TierStats("device", 8, 3, num_promotions=1, num_demotions=2, bytes_migrated=3 * bpb),
        TierStats("host", 6, 1, num_promotions=0, num_demotions=1, bytes_migrated=3 * bpb),
        TierStats("disk", 4, 0, num_promotions=0, num_demotions=0, bytes_migrated=2 * bpb),
    ]
    assert len(stats) == 3 and stats[1].tier == "host"
    again = store.make_stats()
    assert [t.bytes_migrated for t in again] == [0, 0, 0]
    assert again.num_allocations == 0


# ---------------------------------------------------------------- disk file, config


def test_disk_file_is_sized_and_removed_on_close(schema: KVCacheSchema, tmp_path: Path) -> None:
    store = make_store(schema, tmp_path, disk=5)
    disk = store.tier("disk")
    assert isinstance(disk, DiskBlockStore)
    assert Path(disk.path).parent == tmp_path
    assert os.path.getsize(disk.path) == 5 * schema.bytes_per_block
    store.close()
    assert not os.path.exists(disk.path)
    store.close()  # idempotent


def test_disk_tier_sizes_and_directory(schema: KVCacheSchema, tmp_path: Path) -> None:
    disk = DiskBlockStore(
        DiskTierConfig(size_bytes=3 * 512 + 100, directory=str(tmp_path), preallocate=True),
        block_bytes=512,
    )
    assert disk.num_blocks == 3
    disk.close()
    with pytest.raises(ConfigError, match=r"disk tier directory '/no/such/dir' does not exist"):
        DiskBlockStore(DiskTierConfig(num_blocks=1, directory="/no/such/dir"), block_bytes=512)
    with pytest.raises(ConfigError, match=r"size_bytes=100 holds no block of 512 bytes"):
        DiskBlockStore(DiskTierConfig(size_bytes=100), block_bytes=512)
    with pytest.raises(ValidationError, match=r"num_blocks and size_bytes were given together"):
        DiskTierConfig(num_blocks=1, size_bytes=512)


def test_tiers_can_be_left_out(schema: KVCacheSchema, tmp_path: Path) -> None:
    with make_store(schema, tmp_path, host=None) as store:
        assert store.tiers == ("device", "disk")
        ids = store.allocate(1)
        r = store.demote(ids)
        assert r is not None and r.plan.dst_tier == "disk"
    with make_store(schema, tmp_path, disk=None) as store:
        assert store.tiers == ("device", "host")
        with pytest.raises(ValueError, match=r"unknown tier 'disk'"):
            store.allocate("disk", 1)
    with pytest.raises(ConfigError, match=r"quota_tiers names 'disk' but that tier is disabled"):
        make_store(schema, tmp_path, disk=None, quota_tiers=("disk",))


def test_store_config_validation() -> None:
    with pytest.raises(
        ValidationError, match=r"quota_tiers names 'gpu'; valid tiers: device, host, disk"
    ):
        TieredKVStoreConfig(quota_tiers=("gpu",))
    with pytest.raises(ValidationError, match=r"quota of tenant 'a' is -1"):
        TieredKVStoreConfig(quotas={"a": -1})
    with pytest.raises(ValidationError, match="extra"):
        TieredKVStoreConfig(hosts=None)


def test_host_tier_is_a_cpu_paged_pool(store: TieredKVStore) -> None:
    host = store.tier("host")
    assert isinstance(host, PagedKVPool)
    assert host.device.type == "cpu" and host.tier == "host"
    assert host.storage.is_pinned() is torch.cuda.is_available()


def test_move_between_two_quota_tiers_needs_only_net_room(
    schema: KVCacheSchema, tmp_path: Path
) -> None:
    with make_store(schema, tmp_path, quotas={"a": 3}, quota_tiers=("device", "host")) as store:
        ids = store.allocate(3, tenant="a")
        assert store.allocate("host", 1, tenant="a") is None  # 3 held across both tiers
        r = store.demote(ids[:2])
        assert r is not None and r.plan.dst_block_ids == (0, 1)
        assert store.usage() == {"a": 3}
        copy = store.demote([2], dst_tier="host", keep_source=True)
        assert copy is None  # a copy would make 4
        assert [t.quota_violations for t in store.make_tier_stats()] == [0, 2, 0]
        r = store.demote([0, 1], src_tier="host", dst_tier="disk")  # disk is not counted
        assert r is not None
        assert store.usage() == {"a": 1}


def test_disk_moves_in_several_staging_chunks_keep_content(
    store: TieredKVStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sagellm.kv_pool.tiered as tiered_module

    # two blocks per staging round: a three-block move takes two rounds each way
    monkeypatch.setattr(tiered_module, "_STAGING_BYTES", 2 * store.schema.bytes_per_block + 1)
    ids = store.allocate(7)
    data = fill(store, ids, seed=7)
    assert store.allocate("disk", 1) == AllocationResult((0,), "disk")
    down = store.demote([6, 1, 4], dst_tier="disk")
    assert down is not None and down.plan.dst_block_ids == (1, 2, 3)
    store.free("disk", [0])
    store.device_pool.storage.zero_()
    up = store.promote([3, 2, 1], src_tier="disk")
    assert up is not None and up.plan.dst_block_ids == (6, 1, 4)
    assert torch.equal(device_content(store, [6, 1, 4]), data[:, :, [4, 1, 6]])


def test_device_tier_size_shortcuts(schema: KVCacheSchema, tmp_path: Path) -> None:
    disk = {"num_blocks": 1, "directory": str(tmp_path)}
    options = {"num_blocks": 5, "host": {"num_blocks": 2}, "disk": disk}
    with registry.load("kv_pool", "tiered", options, schema=schema) as store:
        assert store.num_blocks == 5
    explicit = {"device": {"num_blocks": 3}, "num_blocks": 5, "host": None, "disk": None}
    with registry.load("kv_pool", "tiered", explicit, schema=schema) as store:
        assert store.num_blocks == 3  # device wins
    config = TieredKVStoreConfig(memory_bytes=10 * schema.bytes_per_block)
    assert config.device_config() == PagedKVPoolConfig(memory_bytes=10 * 512)
    with pytest.raises(ValidationError, match="num_blocks and memory_fraction were given together"):
        TieredKVStoreConfig(num_blocks=3, memory_fraction=0.5)
