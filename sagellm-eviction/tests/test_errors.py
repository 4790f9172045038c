"""Caller mistakes raise errors that say what to do."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sagellm.core import registry
from sagellm.core.errors import ConfigError
from sagellm.eviction import (
    POLICIES,
    CostAwarePolicy,
    KeyAlreadyHeldError,
    KeyNotHeldError,
    LRUConfig,
    LRUPolicy,
    NotPinnedError,
    S3FIFOConfig,
    S3FIFOPolicy,
)


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_is_registered_and_built_with_its_capacity(name: str) -> None:
    policy = registry.load("eviction", name, {}, capacity=16)
    assert type(policy) is POLICIES[name]
    assert policy.capacity == 16 and policy.effective_capacity == 16


def test_unknown_option_is_a_config_error_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="small_ratio"):
        registry.load("eviction", "s3fifo", {"small_ratio": 0.2}, capacity=8)


def test_bad_option_value_is_rejected() -> None:
    with pytest.raises(ValidationError, match="small_size_ratio"):
        S3FIFOConfig(small_size_ratio=1.5)
    with pytest.raises(ConfigError):
        registry.load("eviction", "cost_aware", {"reuse_without_predictor": "magic"})


def test_wrong_config_class_and_capacity() -> None:
    with pytest.raises(ConfigError, match="expected a S3FIFOConfig"):
        S3FIFOPolicy(LRUConfig())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="capacity must be a positive int"):
        LRUPolicy(capacity=0)
    with pytest.raises(ConfigError, match="capacity must be a positive int"):
        LRUPolicy(capacity=2.5)  # type: ignore[arg-type]


def test_predictor_must_implement_the_protocol() -> None:
    with pytest.raises(ConfigError, match="LifetimePredictor"):
        CostAwarePolicy(predictor=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(POLICIES))
def test_key_mistakes(name: str) -> None:
    policy = POLICIES[name](capacity=4)
    policy.insert("a")
    with pytest.raises(KeyAlreadyHeldError, match="call access"):
        policy.insert("a")
    with pytest.raises(KeyNotHeldError, match="insert\\(\\) it first"):
        policy.access("b")
    with pytest.raises(KeyNotHeldError, match="cannot pin 'b'"):
        policy.pin("b")
    with pytest.raises(NotPinnedError, match="more often than pin"):
        policy.unpin("a")
    with pytest.raises(ValueError, match="non-negative"):
        policy.evict(-1)
    policy.remove("b")  # unknown: ignored
    policy.pin("a")
    policy.remove("a")  # a pinned key can be dropped by its owner
    assert len(policy) == 0 and policy.num_pinned == 0
