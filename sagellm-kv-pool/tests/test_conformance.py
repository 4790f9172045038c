"""The shared KVPool conformance suite of sagellm.core.testing, run against PagedKVPool."""

from __future__ import annotations

import pytest

from sagellm.core.types import KVCacheSchema
from sagellm.kv_pool import PagedKVPool, PagedKVPoolConfig

kit = pytest.importorskip("sagellm.core.testing", reason="sagellm-core has no conformance kit")
if not hasattr(kit, "KVPoolConformance"):
    pytest.skip("sagellm.core.testing has no KVPoolConformance yet", allow_module_level=True)


class TestPagedPoolConformance(kit.KVPoolConformance):
    def make_pool(self, schema: KVCacheSchema, num_blocks: int) -> PagedKVPool:
        return PagedKVPool(PagedKVPoolConfig(num_blocks=num_blocks), schema=schema, device="cpu")
