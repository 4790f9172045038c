"""TopologyDetectorConformance passes a correct detector and fails broken ones."""

from __future__ import annotations

import time
from typing import Any

import pytest

from sagellm.core.testing import TopologyDetectorConformance
from sagellm.core.testing.topology import check_topology_info
from sagellm.core.types import TopologyInfo

GOOD = TopologyInfo(
    num_devices=4,
    device_type="cuda",
    numa_nodes=((0, 1), (2, 3)),
    links=((0, 1, "nvlink", 240.0), (0, 2, "sys", 10.0), (2, 3, "pix", 12.0)),
    nvlink=True,
    numa_distances=((10, 21), (21, 10)),
    device_numa=(0, 0, 1, 1),
    link_latency_us=(3.4, 5.7, 5.7),
)


class FixedDetector:
    def __init__(self, info: TopologyInfo, delay: float = 0.0) -> None:
        self.info = info
        self.delay = delay

    def detect(self) -> TopologyInfo:
        if self.delay:
            time.sleep(self.delay)
        return self.info


class TestFixedDetectorConformance(TopologyDetectorConformance):
    def make_detector(self) -> Any:
        return FixedDetector(GOOD)


def test_cpu_machine_links_join_numa_nodes() -> None:
    check_topology_info(
        TopologyInfo(
            num_devices=2,
            numa_nodes=((0, 1),),
            links=((0, 0, "shm", 12.0),),
            link_latency_us=(5.7,),
        )
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"numa_nodes": ((0, 1), (1, 3))}, "device 1 is in two NUMA nodes"),
        ({"numa_nodes": ((0, 1), (2, 4))}, "device 4 in numa_nodes is not below num_devices=4"),
        ({"device_numa": (0, 0, 1, 0)}, "device 3 is listed in NUMA node 1 but device_numa says 0"),
        (
            {"links": ((1, 0, "pix", 12.0),), "link_latency_us": (5.7,), "nvlink": False},
            "smaller endpoint first",
        ),
        (
            {"links": ((0, 9, "pix", 12.0),), "link_latency_us": (5.7,), "nvlink": False},
            r"link \(0, 9\) out of range",
        ),
        (
            {"links": ((0, 1, "pix", 0.0),), "link_latency_us": (5.7,), "nvlink": False},
            "bandwidth 0.0",
        ),
        (
            {
                "links": ((0, 1, "pix", 1.0), (0, 1, "pix", 1.0)),
                "link_latency_us": (1.0, 1.0),
                "nvlink": False,
            },
            "listed twice",
        ),
        ({"link_latency_us": (3.4,)}, "one latency per link"),
        ({"nvlink": False}, "nvlink=False but an nvlink link is listed: True"),
        (
            {"numa_distances": ((10, 21), (5, 10))},
            "node 1 is nearer to another node than to itself",
        ),
        ({"numa_distances": ((10,),)}, "one distance row per NUMA node"),
    ],
)
def test_broken_topology_info_fails(change: dict[str, Any], message: str) -> None:
    broken = GOOD.model_copy(update=change)
    with pytest.raises(AssertionError, match=message):
        check_topology_info(broken)


def test_suite_fails_a_slow_detector() -> None:
    class Slow(TopologyDetectorConformance):
        max_detect_seconds = 0.01

        def make_detector(self) -> Any:
            return FixedDetector(GOOD, delay=0.02)

    with pytest.raises(AssertionError, match=r"detect\(\) took"):
        Slow().test_detect_is_fast()


def test_suite_fails_a_nondeterministic_detector() -> None:
    class Flaky:
        calls = 0

        def detect(self) -> TopologyInfo:
            Flaky.calls += 1
            return GOOD.model_copy(update={"num_devices": 4 + Flaky.calls % 2})

    class Suite(TopologyDetectorConformance):
        def make_detector(self) -> Any:
            return Flaky()

    with pytest.raises(AssertionError):
        Suite().test_detect_is_deterministic()


def test_suite_fails_an_object_without_detect() -> None:
    class Suite(TopologyDetectorConformance):
        def make_detector(self) -> Any:
            return object()

    with pytest.raises(AssertionError):
        Suite().test_is_topology_detector()
