"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

import sagellm.eviction
from sagellm.eviction.config import EvictionConfig, LRUConfig, S3FIFOConfig


def test_version_matches_the_distribution() -> None:
    assert sagellm.eviction.__version__ == importlib.metadata.version("sagellm-eviction")


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


@pytest.mark.parametrize("config_class", [EvictionConfig, LRUConfig, S3FIFOConfig])
def test_config_rejects_unknown_options(config_class: type[EvictionConfig]) -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        config_class(no_such_option=1)


def test_every_policy_declares_its_config_class() -> None:
    for cls in sagellm.eviction.POLICIES.values():
        assert issubclass(cls.config_class, EvictionConfig)
        assert cls().config == cls.config_class()
