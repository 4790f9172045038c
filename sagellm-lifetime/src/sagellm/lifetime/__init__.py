"""sagellm.lifetime: predicts when a KV block or prefix is used again.

:class:`OnlineLifetimePredictor` (entry point ``online`` in ``sagellm.lifetime``) learns
online from the accesses it observes: each access is labelled with the gap to the same
key's next access, bucketed by TTL, and predictions back off from fine to coarse feature
cells. A seeded trace generator and an evaluation harness compare it with baselines.

Usage::

    from sagellm.lifetime import OnlineLifetimePredictor, OnlineLifetimePredictorConfig, kind_index
    from sagellm.core.types import RequestKind

    predictor = OnlineLifetimePredictor(OnlineLifetimePredictorConfig())
    features = {"prefix_depth": 512, "access_count": 3, "seconds_since_last_access": 4.0,
                "request_kind": kind_index(RequestKind.CHAT), "tenant_hash": 17}
    predictor.observe("conv:1", features, now=100.0)
    p = predictor.predict(features)  # p.reuse_probability, p.ttl_seconds, p.ttl_bucket
"""

from sagellm.lifetime._version import __version__
from sagellm.lifetime.baselines import LastGapPredictor, MostFrequentBucketPredictor
from sagellm.lifetime.buckets import FEATURES, KIND_INDEX, TtlBuckets, kind_index
from sagellm.lifetime.config import OnlineLifetimePredictorConfig
from sagellm.lifetime.predictor import OnlineLifetimePredictor

__all__ = [
    "FEATURES",
    "KIND_INDEX",
    "LastGapPredictor",
    "MostFrequentBucketPredictor",
    "OnlineLifetimePredictor",
    "OnlineLifetimePredictorConfig",
    "TtlBuckets",
    "__version__",
    "kind_index",
]
