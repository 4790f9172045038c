"""Conformance suite of :class:`sagellm.core.protocols.TopologyDetector`."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, ClassVar

from sagellm.core.protocols import TopologyDetector
from sagellm.core.types import TopologyInfo

__all__ = ["TopologyDetectorConformance", "check_topology_info"]


def check_topology_info(info: TopologyInfo) -> None:
    """Assert the invariants every :class:`TopologyInfo` holds (see its docstring).

    Device ids in ``numa_nodes`` are distinct and below ``num_devices``; ``device_numa``
    (when given) agrees with them; link endpoints are devices (NUMA node indexes on a
    CPU machine), each pair listed once, with a positive finite bandwidth and one latency
    per link; ``numa_distances`` is square with the smallest value of each row on its
    diagonal; ``nvlink`` is true exactly when an ``nvlink`` link is listed.
    """
    n = info.num_devices
    assert info.device_type and info.device_type == info.device_type.lower()
    seen: set[int] = set()
    for node in info.numa_nodes:
        for dev in node:
            assert 0 <= dev < n, f"device {dev} in numa_nodes is not below num_devices={n}"
            assert dev not in seen, f"device {dev} is in two NUMA nodes"
            seen.add(dev)
    if info.device_numa:
        assert len(info.device_numa) == n, "device_numa needs one entry per device"
        for i, node in enumerate(info.numa_nodes):
            for dev in node:
                assert info.device_numa[dev] == i, (
                    f"device {dev} is listed in NUMA node {i} but device_numa says "
                    f"{info.device_numa[dev]}"
                )
    endpoints = max(1, len(info.numa_nodes)) if info.device_type == "cpu" else n
    pairs = set()
    for a, b, kind, gbps in info.links:
        assert 0 <= a < endpoints and 0 <= b < endpoints, f"link ({a}, {b}) out of range"
        assert a <= b, f"link ({a}, {b}) must list the smaller endpoint first"
        assert (a, b) not in pairs, f"link ({a}, {b}) listed twice"
        pairs.add((a, b))
        assert kind and kind == kind.lower(), f"link kind {kind!r} must be lowercase"
        assert gbps > 0 and math.isfinite(gbps), f"link ({a}, {b}) bandwidth {gbps}"
        if info.device_type != "cpu":
            assert a != b, f"an accelerator link joins two devices, got ({a}, {a})"
    if info.link_latency_us:
        assert len(info.link_latency_us) == len(info.links), "one latency per link"
        assert all(lat >= 0 and math.isfinite(lat) for lat in info.link_latency_us)
    if info.numa_distances:
        k = len(info.numa_distances)
        assert k == len(info.numa_nodes), "one distance row per NUMA node"
        for i, row in enumerate(info.numa_distances):
            assert len(row) == k, f"distance row {i} has {len(row)} entries, not {k}"
            assert row[i] == min(row), f"node {i} is nearer to another node than to itself"
    listed = any(kind == "nvlink" for _, _, kind, _ in info.links)
    assert info.nvlink == listed, f"nvlink={info.nvlink} but an nvlink link is listed: {listed}"


class TopologyDetectorConformance:
    """Behaviour every topology detector shares. Implement :meth:`make_detector`.

    ``max_detect_seconds`` bounds the median of five detections (the launcher calls
    ``detect`` on the critical path of starting ranks).
    """

    max_detect_seconds: ClassVar[float] = 0.1

    def make_detector(self) -> Any:
        """The detector under test (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_detector()")

    def test_is_topology_detector(self) -> None:
        assert isinstance(self.make_detector(), TopologyDetector)

    def test_detect_returns_valid_topology_info(self) -> None:
        info = self.make_detector().detect()
        assert isinstance(info, TopologyInfo)
        check_topology_info(info)

    def test_detect_is_deterministic(self) -> None:
        detector = self.make_detector()
        assert detector.detect() == detector.detect()
        assert self.make_detector().detect() == detector.detect()

    def test_detect_is_fast(self) -> None:
        detector = self.make_detector()
        detector.detect()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            detector.detect()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        assert median < self.max_detect_seconds, (
            f"detect() took {median * 1e3:.1f} ms (median of 5), over "
            f"{self.max_detect_seconds * 1e3:.0f} ms"
        )
