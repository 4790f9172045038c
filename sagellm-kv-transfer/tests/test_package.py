"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

import sagellm.kv_transfer
from sagellm.kv_transfer.config import TorchChannelConfig


def test_version_matches_the_distribution() -> None:
    assert sagellm.kv_transfer.__version__ == importlib.metadata.version("sagellm-kv-transfer")


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        TorchChannelConfig(role="producer", no_such_option=1)
