"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

import sagellm.prefix_cache
from sagellm.core import registry
from sagellm.core.protocols import PrefixIndex
from sagellm.prefix_cache import (
    BlockHashPrefixIndex,
    BlockHashPrefixIndexConfig,
    RadixPrefixIndex,
    RadixPrefixIndexConfig,
)


def test_version_matches_the_distribution() -> None:
    assert sagellm.prefix_cache.__version__ == importlib.metadata.version("sagellm-prefix-cache")


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


@pytest.mark.parametrize("config_class", [RadixPrefixIndexConfig, BlockHashPrefixIndexConfig])
def test_config_rejects_unknown_options(config_class: type) -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        config_class(no_such_option=1)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="latency_reservoir_size"):
        RadixPrefixIndexConfig(latency_reservoir_size=0)
    with pytest.raises(ValidationError, match="hash_algorithm"):
        BlockHashPrefixIndexConfig(hash_algorithm="md5")


@pytest.mark.parametrize(
    ("name", "cls"), [("radix", RadixPrefixIndex), ("block_hash", BlockHashPrefixIndex)]
)
def test_registry_builds_each_index(name: str, cls: type) -> None:
    registry.reset_cache()
    names = [p.name for p in registry.available("prefix_cache")]
    assert name in names
    index = registry.load("prefix_cache", name, {"latency_reservoir_size": 64}, block_size=16)
    assert type(index) is cls
    assert isinstance(index, PrefixIndex)
    assert index.block_size == 16
    assert index.config.latency_reservoir_size == 64
