"""asv benchmarks of sagellm.topology.

``Detect`` times a full ``detect()`` of this machine and of each fixture tree (warm page
cache); ``track_ratio_to_lscpu`` reports the live scan's median against ``lscpu -J``
(which reads the same sysfs for CPUs and caches) measured in the same process, calls
interleaved. ``ShmLink`` tracks the fitted alpha (us) and beta (GB/s) of the
shared-memory link from the two-process ping-pong.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path

from sagellm.topology import SysfsTopologyDetector, TopologyConfig
from sagellm.topology.detector import calibrate_shm

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TREES = ["live", "amd-8s2c", "aws-p4d-8gpu", "intel-2s8c-ib", "intel-4s10c-ib"]


def _detector(tree: str) -> SysfsTopologyDetector:
    root = "/" if tree == "live" else str(FIXTURES / tree)
    return SysfsTopologyDetector(TopologyConfig(root=root, use_nvml=False))


class Detect:
    params = [TREES]
    param_names = ["tree"]

    def setup(self, tree: str) -> None:
        self.detector = _detector(tree)
        self.detector.detect()

    def time_detect(self, tree: str) -> None:
        self.detector.detect()


class LiveAgainstLscpu:
    def setup(self) -> None:
        self.lscpu = shutil.which("lscpu")
        if self.lscpu is None:
            raise NotImplementedError("lscpu is not installed")
        self.detector = _detector("live")

    def track_ratio_to_lscpu(self) -> float:
        ours, theirs = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            self.detector.detect()
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([str(self.lscpu), "-J"], capture_output=True, check=True)
            theirs.append(time.perf_counter() - t0)
        return statistics.median(ours) / statistics.median(theirs)

    track_ratio_to_lscpu.unit = "ratio"  # type: ignore[attr-defined]


class ShmLink:
    timeout = 60

    def setup_cache(self) -> tuple[float, float]:
        cost = calibrate_shm(repeats=10)
        return cost.alpha_us, cost.beta_gbps

    def track_alpha_us(self, cost: tuple[float, float]) -> float:
        return cost[0]

    track_alpha_us.unit = "us"  # type: ignore[attr-defined]

    def track_beta_gbps(self, cost: tuple[float, float]) -> float:
        return cost[1]

    track_beta_gbps.unit = "GB/s"  # type: ignore[attr-defined]
