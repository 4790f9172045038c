"""Detection time on synthetic sysfs trees: ``python -m sagellm.domestic_interconnect.bench``.

A tree holds ``n`` PCI functions, one in four an Ascend NPU and the rest NICs, written
under a temporary folder (``sys/bus/pci/devices/<address>/{vendor,device,class,numa_node}``);
:func:`~sagellm.domestic_interconnect.detect.detect` (sysfs only) is timed on it, warm
page cache, and the median of ``repeats`` runs printed per size, with the live ``/``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sagellm.domestic_interconnect.detect import detect

__all__ = ["measure", "write_tree"]


def write_tree(root: Path, num_functions: int) -> Path:
    """A sysfs tree of ``num_functions`` PCI functions under ``root``; returns ``root``."""
    bus = root / "sys" / "bus" / "pci" / "devices"
    bus.mkdir(parents=True, exist_ok=True)
    for i in range(num_functions):
        d = bus / f"0000:{i // 8:02x}:{i % 8:02x}.0"
        d.mkdir()
        npu = i % 4 == 0
        (d / "vendor").write_text("0x19e5\n" if npu else "0x8086\n")
        (d / "device").write_text("0xd801\n" if npu else "0x1572\n")
        (d / "class").write_text("0x120000\n" if npu else "0x020000\n")
        (d / "numa_node").write_text(f"{i % 2}\n")
    return root


def measure(root: str | Path, repeats: int = 20) -> float:
    """Median seconds of one sysfs-only :func:`detect` of ``root`` (after one warm-up)."""
    detect(root, use_smi=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        detect(root, use_smi=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"live /: {measure('/', args.repeats) * 1e3:.2f} ms")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="sagellm-di-bench-") as folder:
            root = write_tree(Path(folder), n)
            found = len(detect(root, use_smi=False))
            ms = measure(root, args.repeats) * 1e3
            print(f"{n} PCI functions ({found} NPUs): {ms:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
