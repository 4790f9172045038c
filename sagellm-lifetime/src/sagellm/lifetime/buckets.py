"""TTL buckets and the features a predictor reads."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from sagellm.core.types import RequestKind

__all__ = ["FEATURES", "KIND_INDEX", "TtlBuckets", "kind_index"]

#: Feature names the engine passes (a flat mapping of numbers).
FEATURES = (
    "prefix_depth",  # tokens from the sequence start to the end of the entry
    "access_count",  # accesses of the entry so far, this one included
    "seconds_since_last_access",  # gap to the previous access; negative when first
    "request_kind",  # index of the accessing request's RequestKind (KIND_INDEX)
    "tenant_hash",  # a stable non-negative hash of the tenant
)

#: RequestKind -> the number used as the ``request_kind`` feature.
KIND_INDEX = {kind: i for i, kind in enumerate(RequestKind)}


def kind_index(kind: RequestKind | str) -> int:
    """The ``request_kind`` feature value of a request kind."""
    return KIND_INDEX[RequestKind(kind)]


class TtlBuckets:
    """Bucket ``i`` holds gaps in ``[edges[i-1], edges[i])``; the last one ``>= edges[-1]``."""

    __slots__ = ("edges", "num_buckets")

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges = tuple(float(e) for e in edges)
        self.num_buckets = len(self.edges) + 1

    def bucket(self, seconds: float) -> int:
        """Bucket of a gap (``inf`` and gaps past the last edge: the last bucket)."""
        return bisect_right(self.edges, seconds)

    def label(self, i: int) -> str:
        """Human-readable range of bucket ``i``."""
        lo = 0.0 if i == 0 else self.edges[i - 1]
        if i == len(self.edges):
            return f">={lo:g}s"
        return f"{lo:g}-{self.edges[i]:g}s"

    def midpoint(self, i: int) -> float:
        """A representative gap of bucket ``i`` (geometric middle; inf for the last)."""
        if i >= len(self.edges):
            return math.inf
        lo = self.edges[i - 1] if i else self.edges[0] / 4
        return math.sqrt(lo * self.edges[i])
