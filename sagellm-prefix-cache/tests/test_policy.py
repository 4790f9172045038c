"""An injected EvictionPolicy decides the order among evictable leaves."""

from __future__ import annotations

import zlib

import pytest
from _policies import FifoPolicy

from sagellm.core.errors import ConfigError
from sagellm.core.types import EvictionDecision, PolicyContext
from sagellm.prefix_cache import BlockHashPrefixIndex, RadixPrefixIndex

A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
B = [1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 24, 25, 26, 27]
C = [30, 31, 32, 33, 34, 35, 36, 37]


def fill(index: RadixPrefixIndex | BlockHashPrefixIndex) -> None:
    index.insert(A, [100, 101, 102])
    index.insert(C, [300, 301])
    index.insert(B, [200, 201, 202, 203])
    index.match(A)  # LRU would now keep A's tail longest; FIFO ignores it


@pytest.mark.parametrize("cls", [RadixPrefixIndex, BlockHashPrefixIndex])
def test_policy_order_replaces_lru(cls: type) -> None:
    lru = cls(block_size=4)
    fill(lru)
    assert lru.evict(1) == [301]
    policy = FifoPolicy()
    index = cls(block_size=4, eviction_policy=policy)
    assert index.eviction_policy is policy
    fill(index)
    assert index.evict(1) == [102]  # oldest insertion that is a leaf
    assert index.evict(2) == [301, 300]
    assert index.evict(2) == [203, 202]
    assert index.evict(5) == [101, 100]  # their parent became a leaf, then unpinned
    assert len(policy) == 0 and not policy.pins
    index._debug_check()


def test_interior_and_locked_nodes_are_pinned_in_the_policy() -> None:
    policy = FifoPolicy()
    index = RadixPrefixIndex(block_size=4, eviction_policy=policy)
    index.insert(A, [100, 101, 102])  # node 1
    index.insert(B, [200, 201, 202, 203])  # splits: upper node 2 (pinned), leaf node 3
    assert policy.order == [1, 2, 3]
    assert policy.pins == {2: 1}
    m = index.match(B)
    assert policy.calls[-2:] == [("access", 3), ("access", 2)]
    index.lock(m)
    assert policy.pins == {2: 1, 3: 1}  # one pin per node: interior or locked
    assert index.evict(10) == [102]
    assert policy.pins == {2: 1, 3: 1}
    index.unlock(m)
    assert policy.pins == {2: 1}
    assert index.evict(10) == [203, 202, 101, 100]


@pytest.mark.parametrize("cls", [RadixPrefixIndex, BlockHashPrefixIndex])
def test_policy_is_told_prefix_depth_and_tenant(cls: type) -> None:
    policy = FifoPolicy()
    index = cls(block_size=4, eviction_policy=policy)
    index.insert(A, [100, 101, 102], "tenant-a")
    tenant = float(zlib.crc32(b"tenant-a"))
    deepest = policy.order[-1]
    size = 3.0 if cls is RadixPrefixIndex else 1.0  # one edge of 3 blocks, or 1 block a node
    assert policy.features[deepest] == {
        "prefix_depth": 12.0,
        "num_blocks": size,
        "tenant_hash": tenant,
    }
    index.match(A[:8], "tenant-a")  # radix splits the edge: the upper node ends at 8 tokens
    touched = {k: f for k, f in policy.features.items() if f is not None}
    assert sorted(f["prefix_depth"] for f in touched.values()) == (
        [8.0, 12.0] if cls is RadixPrefixIndex else [4.0, 8.0, 12.0]
    )
    assert {f["tenant_hash"] for f in touched.values()} == {tenant}


def test_partially_evicted_leaf_goes_back_to_the_policy() -> None:
    policy = FifoPolicy()
    index = RadixPrefixIndex(block_size=4, eviction_policy=policy)
    index.insert(A, [100, 101, 102])
    index.insert(C, [300, 301])
    assert index.evict(1) == [102]
    # node 1 was handed out as a victim, trimmed, and inserted again (now after C)
    assert policy.order == [2, 1]
    assert index.evict(3) == [301, 300, 101]


def test_clear_removes_keys_from_the_policy() -> None:
    policy = FifoPolicy()
    index = BlockHashPrefixIndex(block_size=4, eviction_policy=policy)
    index.insert(A, [100, 101, 102])
    index.insert(C, [300, 301])
    m = index.match(C)
    index.lock(m)
    assert sorted(index.clear()) == [100, 101, 102]
    assert policy.order == [4, 5]
    assert policy.pins == {4: 1, 5: 1}  # 4: interior (and locked); 5: locked
    index.unlock(m)
    assert policy.pins == {4: 1}


class BrokenPolicy(FifoPolicy):
    def evict(self, num: int, context: PolicyContext | None = None) -> EvictionDecision:
        return EvictionDecision((self.order.pop(0),), "ignores pins")


def test_a_policy_returning_a_pinned_key_is_reported() -> None:
    index = RadixPrefixIndex(block_size=4, eviction_policy=BrokenPolicy())
    index.insert(A, [100, 101, 102])
    index.insert(B, [200, 201, 202, 203])
    index.evict(1)  # node 1 (a leaf) is fine
    with pytest.raises(ConfigError, match="returned 2, which is not an unpinned key"):
        index.evict(1)
