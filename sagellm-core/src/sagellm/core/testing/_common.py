"""Helpers shared by the conformance suites."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings

__all__ = ["suite_settings"]


def suite_settings(max_examples: int, **kwargs: Any) -> settings:
    """Hypothesis settings of a suite: no deadline (shared, noisy machines), no DB noise."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kwargs,
    )
