"""The shared KVPool conformance suite of sagellm.core.testing, run against PagedKVPool."""

from __future__ import annotations

import pytest

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig
from sagellm.kv_pool.config import TieredKVStoreConfig
from sagellm.kv_pool.tiered import TieredKVStore

kit = pytest.importorskip("sagellm.core.testing", reason="sagellm-core has no conformance kit")
if not hasattr(kit, "KVPoolConformance"):
    pytest.skip("sagellm.core.testing has no KVPoolConformance yet", allow_module_level=True)


class TestPagedPoolConformance(kit.KVPoolConformance):
    def make_pool(self, schema: KVCacheSchema, num_blocks: int) -> PagedKVPool:
        return PagedKVPool(PagedKVPoolConfig(num_blocks=num_blocks), schema=schema, device="cpu")


class TestTieredStoreConformance(kit.KVPoolConformance):
    """The tiered store behaves as a KVPool for its device tier."""

    def make_pool(self, schema: KVCacheSchema, num_blocks: int) -> TieredKVStore:
        config = TieredKVStoreConfig(
            device=PagedKVPoolConfig(num_blocks=num_blocks),
            host=PagedKVPoolConfig(num_blocks=4),
            disk=None,
        )
        return TieredKVStore(config, schema=schema, device="cpu")


#: An int8 layout whose token-head rows end in a float16 scale.
QUANTIZED = KVCacheSchema(
    num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="int8", scale_bytes=2
)


class TestQuantizedPagedPoolConformance(TestPagedPoolConformance):
    schema = QUANTIZED


class TestQuantizedTieredStoreConformance(TestTieredStoreConformance):
    schema = KVCacheSchema(
        num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float8_e5m2", scale_bytes=2
    )
