"""Figures of sagellm.topology: ``python -m sagellm.topology.bench [--fixtures DIR]``.

Prints, for this machine and for each fixture tree given: the median and worst of
``detect()`` over repeated scans (warm page cache), next to ``lscpu -J`` (util-linux,
which reads the same sysfs for CPUs and caches) timed in the same run when it is
installed; then the shared-memory link's alpha-beta fitted from the two-process
ping-pong, next to NCCL's prior, and the load average during the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sagellm.topology.config import TopologyConfig
from sagellm.topology.costs import LATENCY_US, fit_alpha_beta, measure_shm_pingpong, pcie_gbps
from sagellm.topology.detector import CALIBRATION_SIZES, SysfsTopologyDetector

__all__ = ["detect_times", "main"]


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def detect_times(root: str, repeats: int = 20) -> list[float]:
    """Seconds per ``detect()`` of the tree under ``root`` (after one warm-up scan)."""
    detector = SysfsTopologyDetector(TopologyConfig(root=root, use_nvml=False))
    return _times(detector.detect, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", help="folder of fixture trees (each holds sys/)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    roots = [("live", "/")]
    if args.fixtures:
        for p in sorted(Path(args.fixtures).iterdir()):
            if (p / "sys").is_dir():
                roots.append((p.name, str(p)))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'tree':<18} {'detect median ms':>17} {'max ms':>8}")
    for name, root in roots:
        t = detect_times(root, args.repeats)
        print(f"{name:<18} {statistics.median(t) * 1e3:>17.2f} {max(t) * 1e3:>8.2f}")
    lscpu = shutil.which("lscpu")
    if lscpu:
        t = _times(lambda: subprocess.run([lscpu, "-J"], capture_output=True, check=True), 10)
        print(f"{'lscpu -J (live)':<18} {statistics.median(t) * 1e3:>17.2f} {max(t) * 1e3:>8.2f}")
    times = measure_shm_pingpong(CALIBRATION_SIZES, repeats=30)
    fit = fit_alpha_beta(CALIBRATION_SIZES, times)
    print("shared-memory one-way time (best of 30): " + ", ".join(
        f"{n} B {t:.1f} us" for n, t in zip(CALIBRATION_SIZES, times)
    ))  # fmt: skip
    print(
        f"fitted shm link: alpha {fit.alpha_us:.1f} us, beta {fit.beta_gbps:.2f} GB/s "
        f"(NCCL prior: {LATENCY_US['pcie']} us, {pcie_gbps(None, None)} GB/s)"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
