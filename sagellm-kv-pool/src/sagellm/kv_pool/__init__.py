"""sagellm.kv_pool: paged KV-cache block pools and a device/host/disk tiered KV store.

Usage::

    from sagellm.core.types import KVCacheSchema
    from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig, TieredKVStore

    schema = KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16)
    pool = PagedKVPool(PagedKVPoolConfig(num_blocks=64), schema=schema, device="cpu")
    ids = pool.allocate(3)          # [0, 1, 2]
    keys, values = pool.layer_cache(0)
    pool.free(ids)

    with TieredKVStore(schema=schema) as store:   # device + host + disk tiers
        ids = store.allocate(2)                    # device blocks, as from a KVPool
        moved = store.demote(ids)                  # to the host tier, content kept
        back = store.promote(list(moved.plan.dst_block_ids), src_tier="host")

Engines select them by name: ``registry.load("kv_pool", "paged" | "tiered", {...},
schema=..., device=...)``.
"""

from sagellm.kv_pool._version import __version__
from sagellm.kv_pool.config import DiskTierConfig, PagedKVPoolConfig, TieredKVStoreConfig
from sagellm.kv_pool.disk import DiskBlockStore
from sagellm.kv_pool.paged import PagedKVPool
from sagellm.kv_pool.tiered import TieredKVPoolStats, TieredKVStore

__all__ = [
    "DiskBlockStore",
    "DiskTierConfig",
    "PagedKVPool",
    "PagedKVPoolConfig",
    "TieredKVPoolStats",
    "TieredKVStore",
    "TieredKVStoreConfig",
    "__version__",
]
