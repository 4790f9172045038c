from __future__ import annotations

import pytest

from sagellm.core.telemetry import KVPoolStats, PrefixCacheStats, TierStats, as_flat_dict


def test_as_flat_dict_includes_numeric_fields_and_properties() -> None:
    stats = PrefixCacheStats(num_lookups=3, num_query_tokens=10, num_matched_tokens=4)
    flat = as_flat_dict(stats)
    assert flat["num_lookups"] == 3.0
    assert flat["hit_rate"] == pytest.approx(0.4)
    assert set(flat) == {
        "num_lookups",
        "num_hits",
        "num_query_tokens",
        "num_matched_tokens",
        "num_evicted_blocks",
        "num_cached_blocks",
        "lookup_p50_us",
        "lookup_p99_us",
        "hit_rate",
    }
    assert all(isinstance(v, float) for v in flat.values())


def test_as_flat_dict_skips_strings() -> None:
    flat = as_flat_dict(TierStats(tier="host", num_blocks=4))
    assert "tier" not in flat and flat["num_blocks"] == 4.0
    assert as_flat_dict(KVPoolStats(utilization=0.25))["utilization"] == 0.25


def test_as_flat_dict_rejects_non_dataclasses() -> None:
    with pytest.raises(TypeError, match="dict is not a stats dataclass"):
        as_flat_dict({"a": 1})
