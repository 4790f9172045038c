"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

import sagellm.topology
from sagellm.topology.config import TopologyConfig


def test_version_matches_the_distribution() -> None:
    assert sagellm.topology.__version__ == importlib.metadata.version("sagellm-topology")


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        TopologyConfig(no_such_option=1)
