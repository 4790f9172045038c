"""GreedyDual with predicted reuse: orderings, inflation, predictor feeding."""

from __future__ import annotations

import math

import pytest
from _predictor import FakePredictor

from sagellm.eviction import CostAwareConfig, CostAwarePolicy


def test_without_predictor_priority_is_cost_times_frequency() -> None:
    policy = CostAwarePolicy()
    policy.insert("a", cost=1.0, now=0.0)
    policy.insert("b", cost=3.0, now=0.0)
    policy.insert("c", cost=1.0, now=0.0)
    policy.access("a", now=1.0)
    policy.access("a", now=2.0)  # a: 1 * 3 = 3, b: 3 * 1 = 3 (older), c: 1
    assert [policy.priority(k) for k in "abc"] == [3.0, 3.0, 1.0]
    assert policy.evict(1).victims == ("c",)
    assert policy.inflation == 1.0
    policy.insert("d", cost=1.0, now=3.0)  # L + 1 = 2
    assert policy.priority("d") == 2.0
    # ties go to the older priority: b was set before a's last access
    assert policy.evict(3).victims == ("d", "b", "a")
    assert policy.inflation == 3.0


def test_priority_is_per_block_for_multi_block_keys() -> None:
    """A radix edge of 8 blocks costs 8 to recompute but also frees 8 blocks."""
    policy = CostAwarePolicy()
    policy.insert("edge", cost=8.0, now=0.0, features={"num_blocks": 8.0})
    policy.insert("block", cost=2.0, now=0.0, features={"num_blocks": 1.0})
    policy.insert("plain", cost=3.0, now=0.0)
    assert [policy.priority(k) for k in ("edge", "block", "plain")] == [1.0, 2.0, 3.0]
    assert policy.evict(3).victims == ("edge", "block", "plain")


def test_reuse_none_is_plain_greedy_dual() -> None:
    policy = CostAwarePolicy(CostAwareConfig(reuse_without_predictor="none"))
    policy.insert("a", cost=2.0, now=0.0)
    policy.insert("b", cost=1.0, now=0.0)
    for t in range(5):
        policy.access("b", now=float(t))
    assert policy.evict(2).victims == ("b", "a")


def test_predicted_reuse_orders_victims() -> None:
    predictor = FakePredictor()
    policy = CostAwarePolicy(predictor=predictor)
    for key, tenant in (("low", 1.0), ("high", 9.0), ("mid", 5.0)):
        policy.insert(key, cost=1.0, now=0.0, features={"tenant_hash": tenant})
    assert policy.evict(3).victims == ("low", "mid", "high")


def test_predictor_floor_keeps_some_of_the_cost() -> None:
    policy = CostAwarePolicy(CostAwareConfig(min_reuse=0.2), predictor=FakePredictor())
    policy.insert("zero", cost=1.0, now=0.0, features={"tenant_hash": 0.0})
    assert policy.priority("zero") == 0.2


def test_observe_gets_owner_and_tracked_features() -> None:
    predictor = FakePredictor()
    policy = CostAwarePolicy(predictor=predictor)
    owner = {"prefix_depth": 64.0, "request_kind": 0.0, "tenant_hash": 3.0}
    policy.insert("k", cost=2.0, now=10.0, features=owner)
    policy.access("k", now=12.5)  # no features: the insert's are reused
    policy.access("k", now=13.0, features={"prefix_depth": 64.0, "tenant_hash": 7.0})
    assert predictor.observed == [
        ("k", {**owner, "access_count": 1.0, "seconds_since_last_access": -1.0}, 10.0),
        ("k", {**owner, "access_count": 2.0, "seconds_since_last_access": 2.5}, 12.5),
        (
            "k",
            {
                "prefix_depth": 64.0,
                "tenant_hash": 7.0,
                "access_count": 3.0,
                "seconds_since_last_access": 0.5,
            },
            13.0,
        ),
    ]
    # prediction (p 0.7, ttl 1 s) worth 2 gaps, blended with the key's own 2 gaps (2.5 s, 0.5 s):
    # p = (2 * 0.7 + 2) / 4 = 0.85, ttl = (2 * 1 + 3) / 4 = 1.25 s; density = cost * p / ttl
    assert policy.priority("k") == 2.0 * 0.85 / 1.25


def test_unpin_pushes_the_key_at_the_current_inflation() -> None:
    policy = CostAwarePolicy()
    policy.insert("a", cost=1.0, now=0.0)
    policy.insert("b", cost=5.0, now=0.0)
    policy.pin("b")
    policy.insert("c", cost=2.0, now=0.0)
    assert policy.evict(1).victims == ("a",)  # L = 1
    policy.unpin("b")
    assert policy.priority("b") == 6.0
    assert policy.evict(2).victims == ("c", "b")


def test_heap_stays_bounded_under_many_accesses() -> None:
    policy = CostAwarePolicy()
    for k in range(10):
        policy.insert(k, now=0.0)
    for t in range(5000):
        policy.access(t % 10, now=float(t))
    assert len(policy._heap) <= 4 * 10 + 64 + 1
    assert sorted(policy.evict(10).victims) == list(range(10))


def _predicted(**config: float) -> CostAwarePolicy:
    return CostAwarePolicy(CostAwareConfig(**config), predictor=FakePredictor())


def test_density_ranks_by_expected_time_to_reuse_and_cost() -> None:
    policy = _predicted()
    # p 0.5 each: density = cost * 0.5 / ttl
    policy.insert("soon", cost=1.0, now=0.0, features={"ttl_seconds": 1.0})
    policy.insert("late", cost=1.0, now=0.0, features={"ttl_seconds": 10.0})
    policy.insert("late_dear", cost=40.0, now=0.0, features={"ttl_seconds": 10.0})
    assert [policy.priority(k) for k in ("soon", "late", "late_dear")] == [0.5, 0.05, 2.0]
    assert policy.evict(3).victims == ("late", "soon", "late_dear")


def test_never_again_goes_first_least_recent_first() -> None:
    policy = _predicted()
    policy.insert("old_never", now=0.0, features={"ttl_seconds": math.inf, "tenant_hash": 9.0})
    policy.insert("rare", now=1.0, features={"ttl_seconds": 1000.0, "tenant_hash": 1.0})
    policy.insert("new_never", now=2.0, features={"ttl_seconds": math.inf, "tenant_hash": 9.0})
    assert policy.priority("old_never") == 0.0
    assert policy.evict(3).victims == ("old_never", "new_never", "rare")


def test_density_ages_between_accesses() -> None:
    policy = _predicted()
    # both p 0.9 (odds 9): "fast" is due in 1 s, "slow" in 10 s
    policy.insert("fast", now=0.0, features={"ttl_seconds": 1.0, "tenant_hash": 9.0})
    policy.insert("slow", now=0.0, features={"ttl_seconds": 10.0, "tenant_hash": 9.0})
    assert policy.priority("fast") == pytest.approx(0.9)
    assert policy.priority("slow") == pytest.approx(0.09)
    # 20 s later "fast" is long overdue: odds 9 * e^-20, p at the 0.01 floor; "slow" has its
    # deadline (density halved) at 10 * ln(11) = 24 s and keeps its rank
    policy.insert("now", now=20.0, features={"ttl_seconds": 1.0, "tenant_hash": 9.0})
    assert policy.evict(1).victims == ("fast",)
    assert policy.priority("slow") == pytest.approx(0.09)
    # at 30 s "slow" is ranked again: odds 9 * e^-3, p = 0.309, density 0.0309
    policy.insert("later", now=30.0, features={"ttl_seconds": 1.0, "tenant_hash": 9.0})
    assert policy.evict(1).victims == ("now",)  # 0.01: 10 s overdue at ttl 1 s
    odds = 9.0 * math.exp(-3.0)
    assert policy.priority("slow") == pytest.approx(odds / (1.0 + odds) / 10.0)


def test_reused_key_overrules_a_never_prediction() -> None:
    policy = _predicted(prior_weight=1.0)
    policy.insert("k", now=0.0, features={"ttl_seconds": math.inf, "tenant_hash": 2.0})
    policy.access("k", now=4.0)
    # own mean gap 4 s; p = (1 * 0.2 + 1) / 2 = 0.6
    assert policy.priority("k") == pytest.approx(0.6 / 4.0)


def test_miss_on_a_ghost_shifts_weight_and_feeds_history() -> None:
    predictor = FakePredictor()
    policy = CostAwarePolicy(capacity=2, predictor=predictor)
    policy.insert("a", now=0.0, features={"ttl_seconds": 10.0})  # density 0.05
    policy.insert("b", now=0.0, features={"ttl_seconds": 1.0})  # density 0.5
    policy.access("b", now=1.0)
    assert policy.evict(1).victims == ("a",)  # the predicted ranking leads at 0.5
    policy.insert("c", now=2.0, features={"ttl_seconds": 1.0})
    policy.evict(1)  # b: p (2 * 0.5 + 1) / 3, ttl 1 s, density 0.667 > c: 0.5, so c goes
    policy.insert("a", now=3.0, features={"ttl_seconds": 10.0})  # a miss on a's ghost
    assert predictor.observed[-1][1]["access_count"] == 2.0
    assert predictor.observed[-1][1]["seconds_since_last_access"] == 3.0
    factor = math.exp(-0.45)
    assert policy.predicted_weight == pytest.approx(0.5 * factor / (0.5 * factor + 0.5))
    # frequency now chooses: L + cost * count, a (2 accesses, L 0) vs b (2): b is older
    assert policy.evict(1).victims == ("b",)
    assert policy.inflation == 2.0
