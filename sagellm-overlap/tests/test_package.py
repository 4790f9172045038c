"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

import sagellm.overlap
from sagellm.overlap.config import OverlapConfig


def test_version_matches_the_distribution() -> None:
    assert sagellm.overlap.__version__ == importlib.metadata.version("sagellm-overlap")


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        OverlapConfig(no_such_option=1)
