"""Conformance suite of :class:`sagellm.core.protocols.EvictionPolicy`."""

from __future__ import annotations

from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sagellm.core.protocols import EvictionPolicy
from sagellm.core.telemetry import EvictionStats
from sagellm.core.testing._common import suite_settings
from sagellm.core.types import EvictionDecision, PolicyContext

__all__ = ["EvictionPolicyConformance"]


class EvictionPolicyConformance:
    """Behaviour every eviction policy shares. Subclass it and implement :meth:`make_policy`.

    ``make_policy(capacity)`` returns a fresh policy for an owner holding at most
    ``capacity`` keys. The suite never holds more than ``capacity`` keys at once (an owner
    asks for victims before it inserts into a full cache), inserts only keys that are not
    held, and passes non-decreasing ``now`` values.
    """

    #: Keys the owner holds at most.
    capacity: ClassVar[int] = 8
    #: Hypothesis examples of the property tests.
    max_examples: ClassVar[int] = 60

    def make_policy(self, capacity: int) -> Any:
        """A fresh policy for ``capacity`` keys (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_policy(capacity)")

    def _filled(self, keys: range) -> Any:
        policy = self.make_policy(self.capacity)
        for i, k in enumerate(keys):
            policy.insert(k, now=float(i))
        return policy

    def test_is_eviction_policy(self) -> None:
        policy = self.make_policy(self.capacity)
        assert isinstance(policy, EvictionPolicy)
        assert len(policy) == 0
        assert 0 not in policy
        decision = policy.evict(3)
        assert isinstance(decision, EvictionDecision)
        assert decision.victims == ()

    def test_insert_contains_and_len(self) -> None:
        policy = self._filled(range(5))
        assert len(policy) == 5
        assert all(k in policy for k in range(5))
        assert 5 not in policy

    def test_accepts_features_and_its_own_clock(self) -> None:
        """``features`` may come with any insert or access; ``now`` may be left out."""
        policy = self.make_policy(self.capacity)
        policy.insert("a", cost=2.0, features={"prefix_depth": 32.0, "tenant_hash": 1.0})
        policy.insert("b")
        policy.access("a", features={"prefix_depth": 32.0, "request_kind": 0.0})
        policy.access("b")
        assert len(policy) == 2 and "a" in policy and "b" in policy
        assert sorted(policy.evict(2).victims) == ["a", "b"]

    def test_evict_returns_held_keys_and_forgets_them(self) -> None:
        policy = self._filled(range(6))
        policy.access(2, now=10.0)
        victims = policy.evict(2, PolicyContext(now=11.0)).victims
        assert len(victims) == 2 and len(set(victims)) == 2
        assert set(victims) <= set(range(6))
        assert all(v not in policy for v in victims)
        assert len(policy) == 4
        rest = policy.evict(10).victims
        assert sorted(rest) == sorted(set(range(6)) - set(victims))
        assert len(policy) == 0

    def test_evict_zero_returns_nothing(self) -> None:
        policy = self._filled(range(3))
        assert policy.evict(0).victims == ()
        assert len(policy) == 3

    def test_pinned_keys_are_never_victims(self) -> None:
        policy = self._filled(range(4))
        for k in (0, 1, 3):
            policy.pin(k)
        assert policy.evict(4).victims == (2,)
        assert policy.evict(4).victims == ()
        assert len(policy) == 3
        policy.unpin(1)
        assert policy.evict(4).victims == (1,)

    def test_pins_nest(self) -> None:
        policy = self._filled(range(1))
        policy.pin(0)
        policy.pin(0)
        policy.unpin(0)
        assert policy.evict(1).victims == ()
        policy.unpin(0)
        assert policy.evict(1).victims == (0,)

    def test_remove_forgets_a_key(self) -> None:
        policy = self._filled(range(3))
        policy.remove(1)
        assert 1 not in policy and len(policy) == 2
        assert sorted(policy.evict(5).victims) == [0, 2]

    def test_make_stats_reports_and_resets_counters(self) -> None:
        policy = self._filled(range(4))
        policy.access(0, now=5.0)
        policy.access(1, now=6.0)
        policy.evict(1)
        stats = policy.make_stats()
        assert isinstance(stats, EvictionStats)
        assert (stats.num_inserts, stats.num_accesses, stats.num_evictions) == (4, 2, 1)
        assert stats.num_entries == 3
        again = policy.make_stats()
        assert (again.num_inserts, again.num_accesses, again.num_evictions) == (0, 0, 0)
        assert again.num_entries == 3

    def test_random_operations_keep_the_contract(self) -> None:
        """Insert, access, pin, unpin, remove and evict in random order against a model."""
        suite = self
        capacity = self.capacity

        class PolicyMachine(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                self.policy = suite.make_policy(capacity)
                self.held: set[int] = set()
                self.pins: dict[int, int] = {}
                self.next_key = 0
                self.now = 0.0

            def tick(self) -> float:
                self.now += 1.0
                return self.now

            def pick(self, keys: set[int], i: int) -> int:
                ordered = sorted(keys)
                return ordered[i % len(ordered)]

            @precondition(lambda self: len(self.held) < capacity)
            @rule(cost=st.floats(0.0, 100.0), depth=st.none() | st.integers(0, 4096))
            def insert(self, cost: float, depth: int | None) -> None:
                key = self.next_key
                self.next_key += 1
                if depth is None:
                    self.policy.insert(key, cost=cost, now=self.tick())
                else:
                    features = {"prefix_depth": float(depth), "tenant_hash": float(key % 3)}
                    self.policy.insert(key, cost=cost, now=self.tick(), features=features)
                self.held.add(key)

            @precondition(lambda self: bool(self.held))
            @rule(i=st.integers(0, 1 << 16), with_features=st.booleans())
            def access(self, i: int, with_features: bool) -> None:
                key = self.pick(self.held, i)
                if with_features:
                    features = {"prefix_depth": float(16 * key), "request_kind": 0.0}
                    self.policy.access(key, now=self.tick(), features=features)
                else:
                    self.policy.access(key, now=self.tick())

            @precondition(lambda self: bool(self.held))
            @rule(i=st.integers(0, 1 << 16))
            def pin(self, i: int) -> None:
                key = self.pick(self.held, i)
                self.policy.pin(key)
                self.pins[key] = self.pins.get(key, 0) + 1

            @precondition(lambda self: bool(self.pins))
            @rule(i=st.integers(0, 1 << 16))
            def unpin(self, i: int) -> None:
                key = self.pick(set(self.pins), i)
                self.policy.unpin(key)
                self.pins[key] -= 1
                if self.pins[key] == 0:
                    del self.pins[key]

            @precondition(lambda self: bool(self.held - set(self.pins)))
            @rule(i=st.integers(0, 1 << 16))
            def remove(self, i: int) -> None:
                key = self.pick(self.held - set(self.pins), i)
                self.policy.remove(key)
                self.held.discard(key)

            @rule(n=st.integers(0, capacity + 2))
            def evict(self, n: int) -> None:
                unpinned = self.held - set(self.pins)
                context = PolicyContext(now=self.tick(), pool_utilization=len(self.held) / capacity)
                victims = self.policy.evict(n, context).victims
                assert len(set(victims)) == len(victims), f"duplicate victims {victims}"
                assert set(victims) <= self.held, f"victims {victims} not all held"
                assert not set(victims) & set(self.pins), f"pinned key among {victims}"
                assert len(victims) == min(n, len(unpinned)), (
                    f"evict({n}) returned {len(victims)} keys with {len(unpinned)} unpinned"
                )
                for v in victims:
                    assert v not in self.policy
                self.held -= set(victims)

            @invariant()
            def consistent(self) -> None:
                assert len(self.policy) == len(self.held)
                for k in self.held:
                    assert k in self.policy

        run_state_machine_as_test(
            PolicyMachine,
            settings=suite_settings(self.max_examples, stateful_step_count=40),
        )
