"""The sysfs detector passes core's TopologyDetector suite, live and on every fixture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sagellm.core import registry
from sagellm.core.testing import TopologyDetectorConformance
from sagellm.topology import SysfsTopologyDetector, TopologyConfig

FIXTURES = Path(__file__).parent / "fixtures"


class TestLiveConformance(TopologyDetectorConformance):
    def make_detector(self) -> Any:
        return SysfsTopologyDetector(TopologyConfig())


class TestP4dConformance(TopologyDetectorConformance):
    def make_detector(self) -> Any:
        return SysfsTopologyDetector(TopologyConfig(root=str(FIXTURES / "aws-p4d-8gpu")))


class TestFourSocketConformance(TopologyDetectorConformance):
    def make_detector(self) -> Any:
        return SysfsTopologyDetector(TopologyConfig(root=str(FIXTURES / "intel-4s10c-ib")))


class TestEightNodeConformance(TopologyDetectorConformance):
    def make_detector(self) -> Any:
        return SysfsTopologyDetector(TopologyConfig(root=str(FIXTURES / "amd-8s2c")))


def test_registered_under_sagellm_topology() -> None:
    registry.reset_cache()
    detector = registry.load("topology", "sysfs", {"root": str(FIXTURES / "amd-8s2c")})
    assert isinstance(detector, SysfsTopologyDetector)
    assert detector.detect().num_devices == 16
