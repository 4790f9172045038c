"""Random get loops with pins: capacity is never exceeded, victims are held and unpinned."""

from __future__ import annotations

from typing import Any

import pytest
from _predictor import FakePredictor
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm.eviction import POLICIES, CostAwarePolicy

ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "get", "get", "pin", "unpin", "remove", "evict"]),
        st.integers(0, 23),
    ),
    max_size=200,
)


def _make(name: str, capacity: int | None) -> Any:
    if name == "cost_aware_predictor":
        return CostAwarePolicy(capacity=capacity, predictor=FakePredictor())
    return POLICIES[name](capacity=capacity)


@pytest.mark.parametrize("name", [*POLICIES, "cost_aware_predictor"])
@pytest.mark.parametrize("given_capacity", [True, False])
@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 12), steps=ops)
def test_random_get_loops_keep_the_contract(
    name: str, given_capacity: bool, capacity: int, steps: list[tuple[str, int]]
) -> None:
    policy = _make(name, capacity if given_capacity else None)
    held: set[int] = set()
    pins: dict[int, int] = {}
    now = 0.0
    for op, key in steps:
        now += 1.0
        if op == "get":
            if key in policy:
                assert key in held
                policy.access(key, now=now, features={"tenant_hash": float(key % 10)})
                continue
            assert key not in held
            if len(held) >= capacity:
                victims = policy.evict(1).victims
                unpinned = held - set(pins)
                assert len(victims) == min(1, len(unpinned))
                assert set(victims) <= unpinned
                held -= set(victims)
                if not victims:
                    continue  # every key pinned: the owner cannot admit
            policy.insert(key, now=now, features={"prefix_depth": 16.0 * key})
            held.add(key)
        elif op == "pin" and key in held:
            policy.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin" and key in pins:
            policy.unpin(key)
            pins[key] -= 1
            if not pins[key]:
                del pins[key]
        elif op == "remove":
            policy.remove(key)
            held.discard(key)
            pins.pop(key, None)
        elif op == "evict":
            victims = policy.evict(key % 3)
            unpinned = held - set(pins)
            assert len(victims.victims) == min(key % 3, len(unpinned))
            assert set(victims.victims) <= unpinned
            held -= set(victims.victims)
        assert len(policy) == len(held) <= capacity
        assert policy.num_pinned == len(pins)
    assert sorted(policy.evict(capacity + 1).victims) == sorted(held - set(pins))
