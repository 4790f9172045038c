"""PagedKVPool: exact block ids, errors, capacity, storage, copies, stats, defragment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from sagellm.core import registry
from sagellm.core.errors import ConfigError
from sagellm.core.protocols import KVPool
from sagellm.core.telemetry import KVPoolStats
from sagellm.core.types import KVBlockInfo, KVCacheSchema
from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig
from sagellm.kv_pool.allocator import fragmentation
from sagellm.kv_pool.capacity import free_device_memory


def make(schema: KVCacheSchema, **options: object) -> PagedKVPool:
    return PagedKVPool(PagedKVPoolConfig(**options), schema=schema, device="cpu")


# ---------------------------------------------------------------- protocol and registry


def test_implements_the_kv_pool_protocol(pool: PagedKVPool) -> None:
    assert isinstance(pool, KVPool)
    assert PagedKVPool.config_class is PagedKVPoolConfig


def test_registered_as_paged(schema: KVCacheSchema) -> None:
    registry.reset_cache()
    names = {info.name: info for info in registry.available("kv_pool")}
    assert names["paged"].distribution == "sagellm-kv-pool"
    pool = registry.load("kv_pool", "paged", {"num_blocks": 5}, schema=schema, device="cpu")
    assert type(pool) is PagedKVPool
    assert pool.num_blocks == 5
    with pytest.raises(ConfigError, match="unknown option"):
        registry.load("kv_pool", "paged", {"blocks": 5}, schema=schema)


# ---------------------------------------------------------------- allocation order


def test_fresh_pool_hands_out_ids_in_order(pool: PagedKVPool) -> None:
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free_blocks == 3
    assert [pool.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_freed_blocks_are_reused_first_in_free_order(pool: PagedKVPool) -> None:
    pool.allocate(6)  # 0..5
    pool.free([4, 1, 2])
    assert pool.allocate(2) == [4, 1]
    assert pool.allocate(3) == [2, 6, 7]
    assert pool.num_free_blocks == 0


def test_last_freed_call_is_reused_before_earlier_ones(pool: PagedKVPool) -> None:
    pool.allocate(8)
    pool.free([0])
    pool.free([5, 6])
    assert pool.allocate(3) == [5, 6, 0]


def test_allocate_returns_none_and_changes_nothing_when_short(pool: PagedKVPool) -> None:
    pool.allocate(6)
    assert pool.can_allocate(2) is True
    assert pool.can_allocate(3) is False
    assert pool.allocate(3) is None
    assert pool.num_free_blocks == 2
    assert pool.allocate(2) == [6, 7]
    assert pool.allocate(1) is None


def test_allocate_zero_and_bad_counts(pool: PagedKVPool) -> None:
    assert pool.allocate(0) == []
    assert pool.can_allocate(0) is True
    assert pool.can_allocate(-1) is False
    with pytest.raises(ValueError, match=r"allocate: num_blocks must be >= 0, got -1"):
        pool.allocate(-1)
    with pytest.raises(ValueError, match=r"allocate: num_blocks must be an int, got 2.0 \(float\)"):
        pool.allocate(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got True \(bool\)"):
        pool.allocate(True)
    assert pool.num_free_blocks == 8


# ---------------------------------------------------------------- references


def test_share_adds_references_and_free_drops_one_each(pool: PagedKVPool) -> None:
    ids = pool.allocate(2)
    pool.share(ids)
    pool.share([0])
    assert [pool.ref_count(0), pool.ref_count(1)] == [3, 2]
    pool.free([0, 1])
    assert [pool.ref_count(0), pool.ref_count(1)] == [2, 1]
    assert pool.num_free_blocks == 6
    pool.free([0, 0, 1])
    assert pool.num_free_blocks == 8
    assert pool.allocate(2) == [0, 1]


def test_share_of_free_or_unknown_block_changes_nothing(pool: PagedKVPool) -> None:
    pool.allocate(2)
    with pytest.raises(ValueError, match=r"share: block 5 is free; only allocated blocks"):
        pool.share([0, 5])
    with pytest.raises(
        ValueError, match=r"share: unknown block id 8; this device pool has blocks 0..7"
    ):
        pool.share([1, 8])
    assert [pool.ref_count(0), pool.ref_count(1)] == [1, 1]


def test_free_of_already_free_block_names_it_and_changes_nothing(pool: PagedKVPool) -> None:
    pool.allocate(3)
    with pytest.raises(
        ValueError,
        match=r"free: block 5 is already free \(reference count 0\); free only blocks you "
        r"allocated or shared, once per reference",
    ):
        pool.free([0, 1, 5])
    assert [pool.ref_count(b) for b in (0, 1, 2)] == [1, 1, 1]
    assert pool.num_free_blocks == 5


def test_free_more_times_than_references_in_one_call(pool: PagedKVPool) -> None:
    pool.allocate(2)
    pool.share([1])
    with pytest.raises(
        ValueError,
        match=r"free: block 1 appears 3 times in this call but holds only 2 reference\(s\)",
    ):
        pool.free([1, 0, 1, 1])
    assert [pool.ref_count(0), pool.ref_count(1)] == [1, 2]
    assert pool.num_free_blocks == 6
    pool.free([1, 0, 1])
    assert pool.num_free_blocks == 8


def test_free_of_unknown_or_non_int_id(pool: PagedKVPool) -> None:
    pool.allocate(2)
    with pytest.raises(
        ValueError, match=r"free: unknown block id -1; this device pool has blocks 0..7"
    ):
        pool.free([0, -1])
    with pytest.raises(ValueError, match=r"free: block ids must be int, got '1' \(str\)"):
        pool.free([0, "1"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"free: block ids must be int, got True \(bool\)"):
        pool.free([True])  # type: ignore[list-item]
    assert [pool.ref_count(0), pool.ref_count(1)] == [1, 1]


def test_numpy_ids_are_accepted_as_ints(pool: PagedKVPool) -> None:
    pool.allocate(3)
    pool.free(np.array([2, 0]))
    assert pool.allocate(2) == [2, 0]
    assert all(type(b) is int for b in pool._free)


def test_ref_count_of_unknown_block(pool: PagedKVPool) -> None:
    assert pool.ref_count(7) == 0
    with pytest.raises(ValueError, match=r"ref_count: unknown block id 8"):
        pool.ref_count(8)


# ---------------------------------------------------------------- block info


def test_block_info_tracks_tenant_and_access(pool: PagedKVPool, schema: KVCacheSchema) -> None:
    ids = pool.allocate(2, tenant="acme")
    info = pool.block_info(1)
    assert isinstance(info, KVBlockInfo)
    assert (info.block_id, info.tier, info.size_bytes, info.ref_count, info.tenant_id) == (
        1,
        "device",
        schema.bytes_per_block,
        1,
        "acme",
    )
    before = info.last_access
    assert before > 0
    pool.touch([1])
    assert pool.block_info(1).last_access >= before
    pool.free(ids)
    assert pool.block_info(1).tenant_id == ""
    assert pool.block_info(1).ref_count == 0
    with pytest.raises(ValueError, match=r"block_info: unknown block id 9"):
        pool.block_info(9)


# ---------------------------------------------------------------- capacity


def test_capacity_from_memory_bytes(schema: KVCacheSchema) -> None:
    assert schema.bytes_per_block == 512
    assert make(schema, memory_bytes=512 * 10 + 511).num_blocks == 10
    assert make(schema, memory_bytes=512).num_blocks == 1


def test_default_capacity_is_512_mib(schema: KVCacheSchema) -> None:
    pool = PagedKVPool(schema=schema)
    assert pool.num_blocks == 512 * 1024 * 1024 // 512
    assert pool.storage.shape == (2, 2, 1024 * 1024, 4, 2, 4)


def test_capacity_from_memory_fraction(schema: KVCacheSchema) -> None:
    free = free_device_memory(torch.device("cpu"))
    pool = make(schema, memory_fraction=0.001)
    expected = int(free * 0.001) // 512
    assert abs(pool.num_blocks - expected) <= expected // 10 + 1  # free memory moves a little


def test_too_little_memory_for_one_block(schema: KVCacheSchema) -> None:
    with pytest.raises(
        ConfigError,
        match=r"memory_bytes=511 \(511 bytes\) holds no block of 512 bytes; give more memory "
        r"or a smaller block_size",
    ):
        make(schema, memory_bytes=511)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"num_blocks": 4, "memory_bytes": 4096},
            "num_blocks and memory_bytes were given together; give at most one of",
        ),
        (
            {"memory_bytes": 4096, "memory_fraction": 0.5},
            "memory_bytes and memory_fraction were given together",
        ),
        ({"memory_fraction": 0.96}, "less than or equal to 0.95"),
        ({"memory_fraction": 0.0}, "greater than 0"),
        ({"num_blocks": 0}, "greater than or equal to 1"),
    ],
)
def test_config_validation(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PagedKVPoolConfig(**options)


def test_config_is_frozen() -> None:
    config = PagedKVPoolConfig(num_blocks=3)
    with pytest.raises(ValidationError):
        config.num_blocks = 4  # type: ignore[misc]


def test_bad_device_and_schema(schema: KVCacheSchema) -> None:
    with pytest.raises(ConfigError, match=r"device 'gpu0' is not a torch device string"):
        PagedKVPool(PagedKVPoolConfig(num_blocks=2), schema=schema, device="gpu0")
    with pytest.raises(ConfigError, match=r"needs schema= a KVCacheSchema, got dict"):
        PagedKVPool(PagedKVPoolConfig(num_blocks=2), schema={})  # type: ignore[arg-type]


def test_memory_fraction_on_unsupported_device(schema: KVCacheSchema) -> None:
    with pytest.raises(ConfigError, match=r"cannot read free memory of a 'meta' device"):
        PagedKVPool(PagedKVPoolConfig(memory_fraction=0.5), schema=schema, device="meta")


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "bytes_per_block"),
    [("float32", torch.float32, 512), ("bfloat16", torch.bfloat16, 256)],
)
def test_storage_dtype_and_layer_views(
    dtype: str, torch_dtype: torch.dtype, bytes_per_block: int
) -> None:
    schema = KVCacheSchema(num_layers=3, num_kv_heads=2, head_dim=4, block_size=4, dtype=dtype)
    assert schema.bytes_per_block == 3 * bytes_per_block // 2
    pool = PagedKVPool(PagedKVPoolConfig(memory_bytes=10 * schema.bytes_per_block), schema=schema)
    assert pool.num_blocks == 10
    assert pool.storage.dtype == torch_dtype
    assert pool.storage.shape == (3, 2, 10, 4, 2, 4)
    k, v = pool.layer_cache(2)
    assert k.shape == v.shape == (10, 4, 2, 4)
    assert k.dtype == torch_dtype
    k[3].fill_(1.5)
    v[3].fill_(-2.0)
    assert torch.all(pool.storage[2, 0, 3] == 1.5)
    assert torch.all(pool.storage[2, 1, 3] == -2.0)
    assert pool.raw_storage.shape == (3, 2, 10, 4, 2, 4 * (4 if dtype == "float32" else 2))
    with pytest.raises(ValueError, match=r"layer_cache: layer must be an int in 0..2, got 3"):
        pool.layer_cache(3)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [
        ("int8", torch.int8),
        ("float8_e4m3fn", torch.float8_e4m3fn),
        ("float8_e5m2", torch.float8_e5m2),
    ],
)
def test_quantized_storage_rows_end_in_their_scale(dtype: str, torch_dtype: torch.dtype) -> None:
    schema = KVCacheSchema(
        num_layers=3, num_kv_heads=2, head_dim=4, block_size=4, dtype=dtype, scale_bytes=2
    )
    # 3 layers x (K, V) x 4 tokens x 2 heads x (4 values + 2 scale bytes)
    assert schema.bytes_per_block == 3 * 2 * 4 * 2 * 6 == 288
    # the same budget as a bfloat16 pool of 10 blocks (512 bytes each)
    pool = PagedKVPool(PagedKVPoolConfig(memory_bytes=10 * 512), schema=schema)
    assert pool.num_blocks == 17  # 5120 // 288
    assert pool.storage.dtype == torch_dtype
    assert pool.storage.shape == (3, 2, 17, 4, 2, 6)
    assert pool.raw_storage.shape == (3, 2, 17, 4, 2, 6)
    k, v = pool.layer_cache(1)
    assert k.shape == v.shape == (17, 4, 2, 6)
    assert pool.block_info(0).size_bytes == 288
    # the scale is a float16 in the row's last two elements
    k[5, 2, 1, 4:].view(torch.float16).fill_(0.125)
    assert pool.storage[1, 0, 5, 2, 1, 4:].view(torch.float16).item() == 0.125


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "float8_e5m2"])
def test_copy_blocks_moves_quantized_values_and_scales_untouched(dtype: str) -> None:
    schema = KVCacheSchema(
        num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=dtype, scale_bytes=2
    )
    pool = make(schema, num_blocks=8)
    raw = pool.raw_storage
    gen = torch.Generator().manual_seed(0)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8))
    before = raw.clone()
    pool.copy_blocks([(1, 5), (2, 6), (7, 0)])
    for s, d in ((1, 5), (2, 6), (7, 0)):
        assert torch.equal(raw[:, :, d], before[:, :, s])
    for b in (1, 2, 3, 4, 7):
        assert torch.equal(raw[:, :, b], before[:, :, b])
    out = torch.empty(2, 2, 2, 4, 2, 6, dtype=torch.uint8)
    pool.gather_blocks([5, 3], out)
    assert torch.equal(out[0], before[:, :, 1]) and torch.equal(out[1], before[:, :, 3])
    pool.scatter_blocks([4, 2], out)
    assert torch.equal(raw[:, :, 4], before[:, :, 1]) and torch.equal(raw[:, :, 2], before[:, :, 3])


def _fill_distinct(pool: PagedKVPool) -> None:
    n = pool.storage.numel()
    pool.storage.copy_(torch.arange(n, dtype=torch.float32).reshape(pool.storage.shape))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_blocks_copies_every_layer_key_and_value(dtype: str) -> None:
    schema = KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=dtype)
    pool = make(schema, num_blocks=8)
    _fill_distinct(pool)
    before = pool.storage.clone()
    pool.copy_blocks([(1, 5), (2, 6), (7, 0)])
    after = pool.storage
    assert torch.equal(after[:, :, 5], before[:, :, 1])
    assert torch.equal(after[:, :, 6], before[:, :, 2])
    assert torch.equal(after[:, :, 0], before[:, :, 7])
    for b in (1, 2, 3, 4, 7):
        assert torch.equal(after[:, :, b], before[:, :, b])


def test_copy_blocks_reads_all_sources_before_writing(pool: PagedKVPool) -> None:
    _fill_distinct(pool)
    before = pool.storage.clone()
    pool.copy_blocks([(0, 1), (1, 2), (2, 3)])  # a shift: overlapping ids
    assert torch.equal(pool.storage[:, :, 1:4], before[:, :, 0:3])
    assert torch.equal(pool.storage[:, :, 0], before[:, :, 0])


def test_copy_blocks_many_scattered_pairs(schema: KVCacheSchema) -> None:
    pool = make(schema, num_blocks=64)
    _fill_distinct(pool)
    before = pool.storage.clone()
    pairs = [(2 * i, 63 - 2 * i) for i in range(20)]  # 20 runs of one block: indexed path
    pool.copy_blocks(pairs)
    for s, d in pairs:
        assert torch.equal(pool.storage[:, :, d], before[:, :, s])


def test_copy_blocks_errors(pool: PagedKVPool) -> None:
    with pytest.raises(ValueError, match=r"copy_blocks: destination block 3 appears twice"):
        pool.copy_blocks([(0, 3), (1, 3)])
    with pytest.raises(ValueError, match=r"copy_blocks: unknown block id 8"):
        pool.copy_blocks([(8, 3)])
    pool.copy_blocks([])


def test_gather_and_scatter_are_block_major(pool: PagedKVPool) -> None:
    _fill_distinct(pool)
    before = pool.storage.clone()
    out = torch.empty((2, 2, 2, 4, 2, 16), dtype=torch.uint8)
    pool.gather_blocks([6, 1], out)
    assert torch.equal(out[0].view(torch.float32), before[:, :, 6])
    assert torch.equal(out[1].view(torch.float32), before[:, :, 1])
    pool.scatter_blocks([0, 3], out)
    assert torch.equal(pool.storage[:, :, 0], before[:, :, 6])
    assert torch.equal(pool.storage[:, :, 3], before[:, :, 1])


# ---------------------------------------------------------------- stats


def test_fragmentation_definition() -> None:
    assert fragmentation([]) == 0.0
    assert fragmentation([3]) == 0.0
    assert fragmentation([5, 4, 6, 7]) == 0.0
    assert fragmentation([0, 2, 4, 6]) == 0.75
    assert fragmentation([9, 1, 2, 3, 7]) == pytest.approx(1 - 3 / 5)


def test_make_stats_reports_and_resets_counters(pool: PagedKVPool) -> None:
    pool.allocate(3)
    pool.allocate(3)
    assert pool.allocate(5) is None
    pool.free([1, 4])
    stats = pool.make_stats()
    assert stats == KVPoolStats(
        num_blocks=8,
        num_used_blocks=4,
        num_free_blocks=4,
        utilization=0.5,
        fragmentation=1 - 2 / 4,  # free: 1, 4, 6, 7
        num_allocations=2,
        num_failed_allocations=1,
        num_frees=2,
    )
    again = pool.make_stats()
    assert (again.num_allocations, again.num_failed_allocations, again.num_frees) == (0, 0, 0)
    assert again.num_used_blocks == 4


def test_shared_block_counts_one_free_when_released(pool: PagedKVPool) -> None:
    pool.allocate(1)
    pool.share([0])
    pool.free([0])
    assert pool.make_stats().num_frees == 0
    pool.free([0])
    assert pool.make_stats().num_frees == 1


# ---------------------------------------------------------------- defragment


def test_defragment_compacts_and_moves_content(pool: PagedKVPool) -> None:
    pool.allocate(8, tenant="t")
    pool.share([6])
    pool.free([0, 2, 3, 5])  # used: 1, 4, 6 (ref 2), 7
    _fill_distinct(pool)
    before = pool.storage.clone()
    mapping = pool.defragment()
    assert mapping == {4: 0, 6: 2, 7: 3}
    assert [pool.ref_count(b) for b in range(8)] == [1, 1, 2, 1, 0, 0, 0, 0]
    assert torch.equal(pool.storage[:, :, 0], before[:, :, 4])
    assert torch.equal(pool.storage[:, :, 2], before[:, :, 6])
    assert torch.equal(pool.storage[:, :, 3], before[:, :, 7])
    assert torch.equal(pool.storage[:, :, 1], before[:, :, 1])
    assert pool.block_info(2).tenant_id == "t"
    assert pool.block_info(6).tenant_id == ""
    assert pool.make_stats().fragmentation == 0.0
    assert pool.allocate(4) == [4, 5, 6, 7]


def test_defragment_of_compact_pool_moves_nothing(pool: PagedKVPool) -> None:
    pool.allocate(3)
    pool.free([2])
    assert pool.defragment() == {}
    assert pool.allocate(2) == [2, 3]
