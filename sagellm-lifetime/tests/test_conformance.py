"""The shared LifetimePredictor conformance suite of sagellm.core.testing."""

from __future__ import annotations

import pytest

from sagellm.lifetime import OnlineLifetimePredictor, OnlineLifetimePredictorConfig

testing = pytest.importorskip("sagellm.core.testing")
LifetimePredictorConformance = getattr(testing, "LifetimePredictorConformance", None)
if LifetimePredictorConformance is None:
    pytest.skip("sagellm.core.testing has no LifetimePredictorConformance", allow_module_level=True)


class TestOnlineConformance(LifetimePredictorConformance):  # type: ignore[misc, valid-type]
    def make_predictor(self) -> OnlineLifetimePredictor:
        return OnlineLifetimePredictor(OnlineLifetimePredictorConfig())
