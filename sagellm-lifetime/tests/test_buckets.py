"""TTL buckets and feature helpers."""

from __future__ import annotations

import math

import pytest

from sagellm.core.types import RequestKind
from sagellm.lifetime import FEATURES, KIND_INDEX, TtlBuckets, kind_index


def test_bucket_edges_are_upper_exclusive() -> None:
    b = TtlBuckets((1.0, 10.0, 60.0, 300.0))
    assert b.num_buckets == 5
    assert [b.bucket(x) for x in (0.0, 0.99, 1.0, 9.9, 10.0, 59.0, 60.0, 299.0, 300.0)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
    ]
    assert b.bucket(math.inf) == 4
    assert [b.label(i) for i in range(5)] == ["0-1s", "1-10s", "10-60s", "60-300s", ">=300s"]
    assert b.midpoint(0) == pytest.approx(0.5)
    assert b.midpoint(1) == pytest.approx(math.sqrt(10.0))
    assert b.midpoint(4) == math.inf
    for i in range(4):
        assert b.bucket(b.midpoint(i)) == i


def test_kind_index_covers_every_request_kind() -> None:
    assert [kind_index(k) for k in RequestKind] == [0, 1, 2, 3]
    assert kind_index("one_off") == KIND_INDEX[RequestKind.ONE_OFF] == 3
    assert FEATURES == (
        "prefix_depth",
        "access_count",
        "seconds_since_last_access",
        "request_kind",
        "tenant_hash",
    )
    with pytest.raises(ValueError):
        kind_index("batch")
