"""sagellm.kv_pool: paged KV-cache block pools for sageLLM engines.

Usage::

    from sagellm.core.types import KVCacheSchema
    from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig

    schema = KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16)
    pool = PagedKVPool(PagedKVPoolConfig(num_blocks=64), schema=schema, device="cpu")
    ids = pool.allocate(3)          # [0, 1, 2]
    keys, values = pool.layer_cache(0)
    pool.free(ids)

Engines select it by name: ``registry.load("kv_pool", "paged", {...}, schema=..., device=...)``.
"""

from sagellm.kv_pool._version import __version__
from sagellm.kv_pool.config import PagedKVPoolConfig
from sagellm.kv_pool.paged import PagedKVPool

__all__ = ["PagedKVPool", "PagedKVPoolConfig", "__version__"]
