"""GreedyDual with predicted reuse: orderings, inflation, predictor feeding."""

from __future__ import annotations

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
    assert policy.priority("k") == 2.0 * 0.7


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
