from __future__ import annotations

import pytest

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig


@pytest.fixture
def schema() -> KVCacheSchema:
    return KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4)


@pytest.fixture
def pool(schema: KVCacheSchema) -> PagedKVPool:
    return PagedKVPool(PagedKVPoolConfig(num_blocks=8), schema=schema, device="cpu")
