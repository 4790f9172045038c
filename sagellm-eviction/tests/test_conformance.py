"""The shared EvictionPolicy conformance suite of sagellm.core.testing, for every policy."""

from __future__ import annotations

from typing import Any

from _predictor import FakePredictor

from sagellm.core.testing import EvictionPolicyConformance
from sagellm.eviction import (
    ARCPolicy,
    CostAwarePolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    SievePolicy,
)


class TestLRUConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return LRUPolicy(capacity=capacity)


class TestFIFOConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return FIFOPolicy(capacity=capacity)


class TestLFUConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return LFUPolicy(capacity=capacity)


class TestARCConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return ARCPolicy(capacity=capacity)


class TestARCWithoutCapacityConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return ARCPolicy()


class TestS3FIFOConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return S3FIFOPolicy(capacity=capacity)


class TestS3FIFOWithoutCapacityConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return S3FIFOPolicy()


class TestSieveConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return SievePolicy(capacity=capacity)


class TestCostAwareConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return CostAwarePolicy(capacity=capacity)


class TestCostAwareWithPredictorConformance(EvictionPolicyConformance):
    def make_policy(self, capacity: int) -> Any:
        return CostAwarePolicy(capacity=capacity, predictor=FakePredictor())
