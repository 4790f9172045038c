"""Checks every sageLLM package starts with: version, namespace layout, strict config."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest
from pydantic import ValidationError

import sagellm.domestic_interconnect
from sagellm.domestic_interconnect import VendorCommConfig


def test_version_matches_the_distribution() -> None:
    assert sagellm.domestic_interconnect.__version__ == importlib.metadata.version(
        "sagellm-domestic-interconnect"
    )


def test_sagellm_stays_a_namespace_package() -> None:
    spec = importlib.util.find_spec("sagellm")
    assert spec is not None and spec.origin in (None, "namespace")


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(ValidationError, match="no_such_option"):
        VendorCommConfig(no_such_option=1)  # type: ignore[call-arg]


def test_import_needs_neither_torch_nor_a_vendor_extension() -> None:
    code = (
        "import sys, sagellm.domestic_interconnect as d; "
        "print(sorted(m for m in ('torch', 'torch_npu', 'torch_mlu', 'torch_xmlir') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
