"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

import sagellm.lifetime
from sagellm.core import registry
from sagellm.core.protocols import LifetimePredictor
from sagellm.lifetime import OnlineLifetimePredictor, OnlineLifetimePredictorConfig


def test_version_matches_the_distribution() -> None:
    assert sagellm.lifetime.__version__ == importlib.metadata.version("sagellm-lifetime")


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        OnlineLifetimePredictorConfig(no_such_option=1)


def test_config_rejects_bad_edges_and_horizon() -> None:
    with pytest.raises(ValidationError, match="strictly increasing"):
        OnlineLifetimePredictorConfig(ttl_bucket_edges=(10.0, 1.0), horizon_seconds=10.0)
    with pytest.raises(ValidationError, match="positive and strictly increasing"):
        OnlineLifetimePredictorConfig(ttl_bucket_edges=(0.0, 1.0), horizon_seconds=1.0)
    with pytest.raises(ValidationError, match="horizon_seconds 30.0 must be one of"):
        OnlineLifetimePredictorConfig(horizon_seconds=30.0)
    with pytest.raises(ValidationError, match="decay"):
        OnlineLifetimePredictorConfig(decay=0.0)


def test_registry_builds_the_online_predictor() -> None:
    registry.reset_cache()
    assert "online" in [p.name for p in registry.available("lifetime")]
    p = registry.load("lifetime", "online", {"horizon_seconds": 60.0})
    assert type(p) is OnlineLifetimePredictor
    assert isinstance(p, LifetimePredictor)
    assert p.config.horizon_seconds == 60.0
