"""Tiered prefix cache: demotion on device eviction, promotion on a later hit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sagellm.core.protocols import PrefixIndex
from sagellm.core.types import KVCacheSchema

# Needs sagellm-prefix-cache beside the engine: runs in `nox -s integration`.
pytestmark = pytest.mark.integration
pytest.importorskip("sagellm.prefix_cache")
pytest.importorskip("sagellm.kv_pool")

from sagellm.engine.kv_tiers import TieredPrefixCache, TieredPrefixCacheConfig  # noqa: E402
from sagellm.kv_pool.config import DiskTierConfig, PagedKVPoolConfig, TieredKVStoreConfig  # noqa: E402
from sagellm.kv_pool.tiered import TieredKVStore  # noqa: E402
from sagellm.prefix_cache.radix import RadixPrefixIndex  # noqa: E402

BS = 2
SCHEMA = KVCacheSchema(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BS)


def make(device: int = 4, host: int | None = 2, disk: int | None = 2) -> tuple[Any, Any]:
    cfg = TieredKVStoreConfig(
        device=PagedKVPoolConfig(num_blocks=device),
        host=PagedKVPoolConfig(num_blocks=host) if host else None,
        disk=DiskTierConfig(num_blocks=disk) if disk else None,
    )
    store = TieredKVStore(cfg, schema=SCHEMA)
    return store, TieredPrefixCache(RadixPrefixIndex(block_size=BS), store)


def fill(store: Any, block_ids: list[int], base: float) -> None:
    """Give each block distinct KV content."""
    kv = store.device_pool.storage
    for i, b in enumerate(block_ids):
        kv[:, :, b] = base + i + torch.arange(kv[:, :, b].numel()).reshape(kv[:, :, b].shape)


def content(store: Any, block_id: int) -> torch.Tensor:
    return store.device_pool.storage[:, :, block_id].clone()


def cache_blocks(
    store: Any, index: Any, tokens: list[int], base: float, key: str = ""
) -> list[int]:
    """Allocate, fill and insert the blocks of ``tokens``; the index keeps the only reference."""
    ids = store.allocate(len(tokens) // BS)
    fill(store, ids, base)
    assert index.insert(tokens, ids, key) == ids
    return ids


def test_is_a_prefix_index() -> None:
    store, index = make()
    assert isinstance(index, PrefixIndex)
    assert index.block_size == BS
    store.close()


def test_rejects_a_pool_without_tiers() -> None:
    with pytest.raises(ValueError, match="use kv_pool 'tiered'"):
        TieredPrefixCache(RadixPrefixIndex(block_size=BS), object())


def test_evicted_blocks_are_demoted_and_promoted_back_with_their_kv() -> None:
    store, index = make(device=4, host=2, disk=2)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    ids = cache_blocks(store, index, tokens, 100.0)
    assert ids == [0, 1, 2, 3]
    before = {b: content(store, b) for b in ids}

    released = index.evict(3)  # leaves first: the tail of the chain
    assert released == [3, 2, 1]
    store.free(released)
    assert index.num_cached_blocks == 1
    # host takes the first two, disk the third; the same token prefixes, same key
    assert index.lower_tier_entries() == [
        ("", 8, (7, 8), "host", 0),
        ("", 6, (5, 6), "host", 1),
        ("", 4, (3, 4), "disk", 0),
    ]
    stats = index.make_stats()
    assert (stats.num_demoted_blocks, stats.num_lower_tier_blocks) == (3, 3)
    assert stats.num_demoted_bytes == 3 * SCHEMA.bytes_per_block
    assert (stats.host_used_blocks, stats.host_blocks) == (2, 2)
    assert (stats.disk_used_blocks, stats.disk_blocks) == (1, 2)

    # Overwrite the freed device blocks so promotion must really copy the KV back.
    store.device_pool.storage[:, :, 1:] = -1.0
    match = index.match(tokens + [9])
    assert match.num_tokens == 8
    assert match.block_ids[0] == 0
    assert index.lower_tier_entries() == []
    for old, new in zip(ids, match.block_ids):
        assert torch.equal(content(store, new), before[old])
    stats = index.make_stats()
    assert (stats.num_promoted_blocks, stats.num_promoted_tokens) == (3, 6)
    assert stats.num_promoted_bytes == 3 * SCHEMA.bytes_per_block
    # Everything is back on the device and owned by the index alone.
    assert index.num_cached_blocks == 4
    assert store.num_free_blocks == 0
    store.free(index.clear())
    assert store.num_free_blocks == 4
    store.close()


def test_isolation_keys_are_kept_below_the_device() -> None:
    store, index = make(device=4, host=4, disk=None)
    tokens = [1, 2, 3, 4]
    cache_blocks(store, index, tokens, 0.0, key="alice")
    store.free(index.evict(2))
    assert [e[0] for e in index.lower_tier_entries()] == ["alice", "alice"]
    assert index.match(tokens, "bob").num_tokens == 0
    assert index.num_lower_tier_blocks == 2
    assert index.match(tokens, "alice").num_tokens == 4
    assert index.num_lower_tier_blocks == 0
    store.free(index.clear())
    store.close()


def test_full_lower_tiers_drop_their_oldest_block() -> None:
    store, index = make(device=2, host=1, disk=None)
    cache_blocks(store, index, [1, 2], 0.0)
    store.free(index.evict(1))
    cache_blocks(store, index, [7, 8], 10.0)
    store.free(index.evict(1))
    assert index.lower_tier_entries() == [("", 2, (7, 8), "host", 0)]
    assert index.make_stats().num_dropped_blocks == 1
    assert index.match([1, 2, 3]).num_tokens == 0
    assert index.match([7, 8, 3]).num_tokens == 2
    store.free(index.clear())
    assert store.num_free_blocks == 2
    store.close()


def test_promotion_makes_room_by_demoting_other_device_blocks() -> None:
    store, index = make(device=2, host=4, disk=None)
    cache_blocks(store, index, [1, 2, 3, 4], 0.0)
    store.free(index.evict(2))
    cache_blocks(store, index, [5, 6, 7, 8], 50.0)  # the device is full again
    match = index.match([1, 2, 3, 4, 0])
    assert match.num_tokens == 4
    # the other prefix went down to make room
    assert sorted(e[1:3] for e in index.lower_tier_entries()) == [(2, (5, 6)), (4, (7, 8))]
    store.free(index.clear())
    assert store.num_free_blocks == 2
    store.close()


def test_a_lower_tier_policy_chooses_the_dropped_block() -> None:
    """With a policy for the lower tiers, its victim is dropped, not the oldest block."""
    from collections import OrderedDict

    from sagellm.core.types import EvictionDecision

    class NewestFirst:
        config_class = TieredPrefixCacheConfig

        def __init__(self) -> None:
            self.keys: OrderedDict[Any, None] = OrderedDict()
            self.calls: list[str] = []

        def insert(self, key: Any, **kw: Any) -> None:
            self.keys[key] = None
            self.calls.append(f"insert depth={kw['features']['prefix_depth']:.0f}")

        def remove(self, key: Any) -> None:
            del self.keys[key]
            self.calls.append("remove")

        def evict(self, num: int, context: Any = None) -> EvictionDecision:
            victims = tuple(self.keys)[::-1][:num]
            for k in victims:
                del self.keys[k]
            self.calls.append("evict")
            return EvictionDecision(victims)

    store, _ = make(device=2, host=2, disk=None)
    policy = NewestFirst()
    index = TieredPrefixCache(RadixPrefixIndex(block_size=BS), store, lower_policy=policy)
    cache_blocks(store, index, [1, 2], 0.0)
    store.free(index.evict(1))
    cache_blocks(store, index, [3, 4], 0.0)
    store.free(index.evict(1))
    cache_blocks(store, index, [5, 6], 0.0)
    store.free(index.evict(1))  # host full: the policy drops (3, 4), the newest
    assert [e[2] for e in index.lower_tier_entries()] == [(1, 2), (5, 6)]
    assert policy.calls == ["insert depth=2", "insert depth=2", "evict", "insert depth=2"]
    assert index.match([1, 2, 0]).num_tokens == 2  # promoted: the policy forgets it
    assert policy.calls[-1] == "remove" and len(policy.keys) == 1
    store.free(index.clear())
    assert len(policy.keys) == 0
    assert store.num_free_blocks == 2 and store.tier("host").num_free_blocks == 2
    store.close()


def test_a_hash_collision_below_the_device_is_a_miss() -> None:
    """Stored tokens are compared on a hit: an entry under the same chain hash but with
    other tokens is not used."""
    from dataclasses import replace

    store, index = make(device=2, host=2, disk=None)
    cache_blocks(store, index, [1, 2, 3, 4], 0.0)
    store.free(index.evict(2))
    # forge the state a collision would leave: block [3, 4]'s slot holds other tokens
    [second] = [h for h, (k, _, _) in index._lower.items() if k.tokens == (3, 4)]
    key, tier, bid = index._lower[second]
    index._lower[second] = (replace(key, tokens=(9, 9)), tier, bid)
    match = index.match([1, 2, 3, 4, 0])
    assert match.num_tokens == 2  # only the first block came back
    assert index.num_lower_tier_blocks == 1
    store.free(index.clear())
    assert store.num_free_blocks == 2 and store.tier("host").num_free_blocks == 2
    store.close()


def test_reinserting_a_demoted_prefix_releases_the_lower_copy() -> None:
    store, index = make(device=2, host=2, disk=None)
    cache_blocks(store, index, [1, 2], 0.0)
    store.free(index.evict(1))
    assert index.num_lower_tier_blocks == 1
    cache_blocks(store, index, [1, 2], 0.0)  # recomputed elsewhere and inserted again
    assert index.num_lower_tier_blocks == 0
    assert store.tier("host").num_free_blocks == 2
    store.free(index.clear())
    store.close()


def test_metrics_publish_migrations_and_tier_occupancy() -> None:
    pytest.importorskip("prometheus_client")
    from sagellm.engine.metrics import PrometheusPublisher

    store, index = make(device=4, host=2, disk=2)
    cache_blocks(store, index, [1, 2, 3, 4, 5, 6], 0.0)
    store.free(index.evict(3))
    pub = PrometheusPublisher("m")
    pub.publish({"prefix_index": index.make_stats()})
    pub.publish({"prefix_index": index.make_stats()})  # gauges stay, counters add nothing
    text = pub.render().decode()
    assert 'sagellm_prefix_index_num_demoted_blocks_total{model_name="m"} 3.0' in text
    assert 'sagellm_prefix_index_num_lower_tier_blocks{model_name="m"} 3.0' in text
    assert 'sagellm_prefix_index_host_used_blocks{model_name="m"} 2.0' in text
    assert 'sagellm_prefix_index_disk_used_blocks{model_name="m"} 1.0' in text
    assert 'sagellm_prefix_index_num_evicted_blocks_total{model_name="m"} 3.0' in text
    store.free(index.clear())
    store.close()


def test_sagellm_bench_workload_runs_the_kv_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    from sagellm.engine import cli
    from sagellm.engine.bench import kv_workloads

    seen: list[list[str]] = []
    monkeypatch.setattr(kv_workloads, "main", lambda argv: seen.append(list(argv)))
    assert cli.main(["bench", "--workload", "tiers", "--threads", "1", "--dtype", "float32"]) == 0
    assert seen == [["tiers", "--threads", "1", "--dtype", "float32"]]


class _CapacityInConfig:
    """An eviction policy that takes its capacity and predictor through config/context."""

    from pydantic import BaseModel as _B

    class config_class(_B):  # noqa: N801
        capacity: int
        weight: float = 1.0

    def __init__(self, config: Any, *, predictor: Any = None) -> None:
        self.config, self.predictor = config, predictor


class _CapacityInContext:
    config_class = TieredPrefixCacheConfig

    def __init__(self, config: Any, *, capacity: int, lifetime_predictor: Any = None) -> None:
        self.capacity, self.predictor = capacity, lifetime_predictor


@pytest.mark.parametrize("cls", [_CapacityInConfig, _CapacityInContext])
def test_builder_hands_capacity_and_predictor_either_way(
    monkeypatch: pytest.MonkeyPatch, cls: Any
) -> None:
    from sagellm.core.config import EngineConfig
    from sagellm.engine import builder as b

    def load(group: str, name: str, options: Any, **ctx: Any) -> Any:
        klass = b.registry.load_class(group, name)
        return klass(klass.config_class(**options), **ctx)

    monkeypatch.setattr(b.registry, "load_class", lambda group, name: cls)
    monkeypatch.setattr(b.registry, "load", load)
    cfg = EngineConfig.model_validate({"eviction": {"name": "x"}})
    marker = object()
    policy = b.EngineBuilder(cfg)._build_optional(
        "eviction", {"capacity": 12, "lifetime_predictor": marker, "predictor": marker}
    )
    capacity = getattr(policy, "capacity", None) or policy.config.capacity
    assert capacity == 12
    assert policy.predictor is marker
