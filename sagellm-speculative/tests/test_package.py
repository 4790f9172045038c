"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
from pydantic import ValidationError

import sagellm.speculative
from sagellm.speculative.config import NgramConfig, SpeculativeConfig, SuffixConfig


def test_version_matches_the_distribution() -> None:
    assert sagellm.speculative.__version__ == importlib.metadata.version("sagellm-speculative")


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


def test_config_rejects_unknown_options() -> None:
    for cls in (NgramConfig, SuffixConfig):
        with pytest.raises(ValidationError, match="no_such_option"):
            cls(no_such_option=1)


def test_speculative_config_passes_proposer_options_on() -> None:
    cfg = SpeculativeConfig.model_validate(
        {
            "method": "ngram",
            "num_speculative_tokens": 4,
            "prompt_lookup_max": 5,
            "disable_by_batch_size": 8,
        }
    )
    assert cfg.proposer_options() == {"num_speculative_tokens": 4, "prompt_lookup_max": 5}
    assert cfg.disable_by_batch_size == 8
    # an option no proposer knows fails when the proposer's own config reads it
    with pytest.raises(ValidationError, match="no_such_option"):
        NgramConfig(**SpeculativeConfig(no_such_option=1).proposer_options())
