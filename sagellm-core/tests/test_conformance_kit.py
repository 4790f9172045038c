"""Every conformance suite of sagellm.core.testing, run against the reference implementations."""

from __future__ import annotations

from typing import Any

from core_reference import (
    CountingPredictor,
    DictPrefixIndex,
    FCFSConfig,
    FCFSScheduler,
    ListKVPool,
    ListPoolConfig,
    LRUPolicy,
)

from sagellm.core.platforms import CpuPlatform, CudaPlatform, RocmPlatform
from sagellm.core.testing import (
    EvictionPolicyConformance,
    KVPoolConformance,
    LifetimePredictorConformance,
    PlatformConformance,
    PrefixIndexConformance,
    SchedulerConformance,
)
from sagellm.core.types import KVCacheSchema


class TestListKVPool(KVPoolConformance):
    def make_pool(self, schema: KVCacheSchema, num_blocks: int) -> ListKVPool:
        return ListKVPool(ListPoolConfig(num_blocks=num_blocks), schema=schema)


class TestListKVPoolQuantized(TestListKVPool):
    """The suite on an int8 layout whose rows end in a float16 scale."""

    schema = KVCacheSchema(
        num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="int8", scale_bytes=2
    )


class TestDictPrefixIndex(PrefixIndexConformance):
    def make_index(self, block_size: int) -> DictPrefixIndex:
        return DictPrefixIndex(block_size=block_size)


class TestLRUPolicy(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> LRUPolicy:
        return LRUPolicy(capacity=capacity)


class TestCountingPredictor(LifetimePredictorConformance):
    def make_predictor(self) -> CountingPredictor:
        return CountingPredictor()


class TestFCFSScheduler(SchedulerConformance):
    def make_pool(self, num_blocks: int, block_size: int) -> ListKVPool:
        schema = KVCacheSchema(num_layers=1, num_kv_heads=1, head_dim=4, block_size=block_size)
        return ListKVPool(ListPoolConfig(num_blocks=num_blocks), schema=schema)

    def make_scheduler(
        self, pool: Any, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> FCFSScheduler:
        config = FCFSConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        return FCFSScheduler(config, kv_pool=pool, max_model_len=max_model_len)


class TestCpuPlatform(PlatformConformance):
    def make_platform(self) -> CpuPlatform:
        return CpuPlatform()


class TestCudaPlatform(PlatformConformance):
    def make_platform(self) -> CudaPlatform:
        return CudaPlatform()


class TestRocmPlatform(PlatformConformance):
    def make_platform(self) -> RocmPlatform:
        return RocmPlatform()
