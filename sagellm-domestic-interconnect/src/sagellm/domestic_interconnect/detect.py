"""Which domestic accelerators a machine holds, without their torch extensions.

Two sources, both readable by an unprivileged process and neither needing torch:

- sysfs: every ``sys/bus/pci/devices/<address>`` under a configurable root, with its
  ``vendor``, ``device``, ``class`` and ``numa_node`` files. A function counts as an
  accelerator when its vendor id is one of :data:`VENDORS` and its PCI class is a display
  controller (base class 0x03), a processing accelerator (0x12) or a co-processor
  (0x0b40): the same vendor ids also mark host bridges, NICs and disks (Hygon's CPUs,
  Huawei's Hi1822 NICs), which this rule leaves out. Huawei functions must also have a
  device id 0xd000-0xdfff, the range of the Ascend chips (the HiSilicon crypto and
  compression engines are processing accelerators too, with ids 0xa2xx).
- the vendor's SMI tool when it is on ``PATH`` (``npu-smi``, ``cnmon``, ``hy-smi``,
  ``xpu_smi``/``xpu-smi``, ``mx-smi``): reported in :func:`smi_tools`; for a vendor whose
  devices sysfs does not show (a container without ``/sys/bus/pci``), the count the tool
  prints is turned into devices with source ``smi:<tool>``. The tools' arguments and
  output patterns are best effort (not checked against real tools); output that does not
  match adds nothing.

So a diagnostic tool can say "2 Ascend devices present, torch_npu missing"::

    from sagellm.domestic_interconnect import detect, summarize
    print(summarize(detect()))
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SMI_TOOLS",
    "VENDORS",
    "DetectedDevice",
    "Vendor",
    "detect",
    "is_accelerator",
    "parse_smi_count",
    "scan_sysfs",
    "smi_tools",
    "summarize",
]


@dataclass(frozen=True, slots=True)
class Vendor:
    """A domestic accelerator maker and the sageLLM platform serving its devices."""

    name: str  # short vendor name: "huawei"
    platform: str  # sageLLM platform name: "ascend"
    product: str  # what users call the devices: "Ascend NPU"
    extension: str  # the torch extension (pip name) that drives them


# PCI vendor ids, checked against the PCI ID Repository (https://pci-ids.ucw.cz, file
# pci.ids of github.com/pciutils/pciids, snapshot of 2026-08-22):
#   19e5 "Huawei Technologies Co., Ltd."
#   cabc "Cambricon Technologies Corporation Limited" (0270 MLU270-S4, 0370 MLU370-S4)
#   1d94 "Chengdu Haiguang IC Design Co., Ltd." (Hygon; 6211 the K100 DCU, plus its CPUs' functions)
#   1d22 "Baidu Technology" (3684 the first Kunlun accelerator, 3685 a Kunlun2 virtual function)
#   9999 "MetaX Integrated Circuits (Shanghai) Co., Ltd." (0a01 C500)
# NVIDIA (10de) and AMD (1002) are served by sagellm-core's cuda and rocm platforms.
VENDORS: Mapping[int, Vendor] = {
    0x19E5: Vendor("huawei", "ascend", "Ascend NPU", "torch_npu"),
    0xCABC: Vendor("cambricon", "cambricon", "Cambricon MLU", "torch_mlu"),
    0x1D94: Vendor("hygon", "hygon", "Hygon DCU", "torch (DTK build)"),
    0x1D22: Vendor("kunlun", "kunlun", "Kunlun XPU", "torch_xmlir"),
    0x9999: Vendor("metax", "metax", "MetaX GPU", "torch (MACA build)"),
}

_PLATFORM_VENDOR = {v.platform: (vid, v) for vid, v in VENDORS.items()}

#: platform -> SMI tools that list its devices, in the order they are tried.
SMI_TOOLS: Mapping[str, tuple[str, ...]] = {
    "ascend": ("npu-smi",),
    "cambricon": ("cnmon",),
    "hygon": ("hy-smi",),
    "kunlun": ("xpu_smi", "xpu-smi"),
    "metax": ("mx-smi",),
}

# argv after the tool's name that lists the devices
_SMI_ARGS: Mapping[str, tuple[str, ...]] = {
    "npu-smi": ("info", "-l"),
    "cnmon": ("info", "-c"),
    "hy-smi": (),
    "xpu_smi": (),
    "xpu-smi": (),
    "mx-smi": ("-L",),
}

_ACCEL_CLASS_BASES = (0x03, 0x12)  # display controller, processing accelerator
_COPROCESSOR_CLASS = 0x0B40
_ASCEND_DEVICE_RANGE = range(0xD000, 0xE000)


@dataclass(frozen=True, slots=True)
class DetectedDevice:
    """One accelerator physically present on the machine."""

    platform: str  # "ascend", "cambricon", "hygon", "kunlun", "metax"
    vendor: str  # "huawei", ...
    pci_address: str  # "0000:3b:00.0"; "" when only an SMI tool reported it
    vendor_id: int  # PCI vendor id
    device_id: int  # PCI device id; -1 when unknown
    numa_node: int = -1  # -1: unknown or a single-node machine
    source: str = "sysfs"  # "sysfs" or "smi:<tool>"


def is_accelerator(vendor_id: int, device_id: int, class_id: int) -> bool:
    """Whether a PCI function with these ids is a domestic accelerator (see module doc)."""
    if vendor_id not in VENDORS:
        return False
    base = (class_id >> 16) & 0xFF
    if base not in _ACCEL_CLASS_BASES and (class_id >> 8) & 0xFFFF != _COPROCESSOR_CLASS:
        return False
    if VENDORS[vendor_id].name == "huawei":
        return device_id in _ASCEND_DEVICE_RANGE
    return True


def _read_hex(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def _read_node(path: Path) -> int:
    try:
        node = int(path.read_text().strip())
    except (OSError, ValueError):
        return -1
    return node if node >= 0 else -1


def scan_sysfs(root: str | os.PathLike[str] = "/") -> list[DetectedDevice]:
    """Accelerators under ``root``/sys/bus/pci/devices, in PCI address order.

    ``root`` that is not a folder raises ``ValueError`` naming it; a root without a PCI
    bus folder (a container, a machine without PCI) gives ``[]``.
    """
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"detection root {str(base)!r} is not a folder")
    bus = base / "sys" / "bus" / "pci" / "devices"
    try:
        names = sorted(os.listdir(bus))
    except OSError:
        return []
    found = []
    for name in names:
        dev = bus / name
        vendor_id = _read_hex(dev / "vendor")
        if vendor_id is None or vendor_id not in VENDORS:
            continue
        device_id = _read_hex(dev / "device")
        class_id = _read_hex(dev / "class")
        if class_id is None or not is_accelerator(
            vendor_id, -1 if device_id is None else device_id, class_id
        ):
            continue
        vendor = VENDORS[vendor_id]
        found.append(
            DetectedDevice(
                platform=vendor.platform,
                vendor=vendor.name,
                pci_address=name,
                vendor_id=vendor_id,
                device_id=-1 if device_id is None else device_id,
                numa_node=_read_node(dev / "numa_node"),
            )
        )
    return found


def smi_tools(which: Callable[[str], str | None] = shutil.which) -> dict[str, str]:
    """SMI tool name -> path, for the vendor tools found on ``PATH``."""
    out = {}
    for tools in SMI_TOOLS.values():
        for tool in tools:
            path = which(tool)
            if path:
                out[tool] = path
    return out


# "Total Count : 8" (npu-smi info -l); otherwise one device per line naming a card index
_TOTAL = re.compile(r"^\s*Total\s+Count\s*:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)
_DEVICE_LINE: Mapping[str, re.Pattern[str]] = {
    "cnmon": re.compile(r"^\s*Card\s+\d+\b", re.IGNORECASE | re.MULTILINE),
    "hy-smi": re.compile(r"^\s*\d+\s+\S+.*%", re.MULTILINE),
    "xpu_smi": re.compile(
        r"^\s*\|?\s*\d+\s+\|?\s*\S*(P800|R200|R300|R480|XPU|Kunlun)", re.I | re.M
    ),
    "xpu-smi": re.compile(
        r"^\s*\|?\s*\d+\s+\|?\s*\S*(P800|R200|R300|R480|XPU|Kunlun)", re.I | re.M
    ),
    "mx-smi": re.compile(r"^\s*GPU#?\s*\d+\b", re.IGNORECASE | re.MULTILINE),
}


def parse_smi_count(tool: str, text: str) -> int | None:
    """Devices listed in ``text``, what ``tool`` printed; None when nothing is recognised.

    A ``Total Count : N`` line wins (npu-smi); else the lines that start a device entry
    are counted (``Card N`` for cnmon, ``GPU#N`` for mx-smi, an index row for hy-smi and
    xpu_smi).
    """
    m = _TOTAL.search(text)
    if m is not None:
        return int(m.group(1))
    pattern = _DEVICE_LINE.get(tool)
    if pattern is None:
        return None
    n = len(pattern.findall(text))
    return n if n > 0 else None


def _run_tool(path: str, args: Sequence[str], timeout_s: float) -> str | None:
    try:
        done = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _from_smi(
    platform: str, tools: Mapping[str, str], run: Callable[[str, Sequence[str]], str | None]
) -> list[DetectedDevice]:
    vendor_id, vendor = _PLATFORM_VENDOR[platform]
    for tool in SMI_TOOLS[platform]:
        path = tools.get(tool)
        if path is None:
            continue
        text = run(path, _SMI_ARGS.get(tool, ()))
        count = parse_smi_count(tool, text) if text is not None else None
        if count:
            return [
                DetectedDevice(
                    platform=platform,
                    vendor=vendor.name,
                    pci_address="",
                    vendor_id=vendor_id,
                    device_id=-1,
                    source=f"smi:{tool}",
                )
                for _ in range(count)
            ]
    return []


def detect(
    root: str | os.PathLike[str] = "/",
    *,
    use_smi: bool = True,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[[str, Sequence[str]], str | None] | None = None,
    smi_timeout_s: float = 10.0,
) -> list[DetectedDevice]:
    """Domestic accelerators present on the machine whose sysfs is under ``root``.

    sysfs devices first (PCI order); then, with ``use_smi``, for each platform sysfs shows
    nothing of, the devices its SMI tool counts. ``which`` and ``run`` (``run(path,
    args) -> stdout or None``) replace ``shutil.which`` and running the tool (tests).
    Deterministic for a given tree and tool output.
    """
    found = scan_sysfs(root)
    if not use_smi:
        return found
    tools = smi_tools(which)
    if not tools:
        return found
    runner = run or (lambda path, args: _run_tool(path, args, smi_timeout_s))
    seen = {d.platform for d in found}
    for platform in SMI_TOOLS:
        if platform not in seen:
            found.extend(_from_smi(platform, tools, runner))
    return found


def summarize(
    devices: Iterable[DetectedDevice], extensions: Mapping[str, bool] | None = None
) -> str:
    """One line per platform: ``2 Ascend NPU device(s) present (sysfs); torch_npu missing``.

    ``extensions`` maps platform -> whether its torch extension is usable; platforms
    missing from it are reported without that clause. No devices: ``no domestic
    accelerators found``.
    """
    counts: Counter[str] = Counter()
    sources: dict[str, set[str]] = {}
    for d in devices:
        counts[d.platform] += 1
        sources.setdefault(d.platform, set()).add(d.source)
    if not counts:
        return "no domestic accelerators found"
    lines = []
    for platform in sorted(counts):
        vendor = _PLATFORM_VENDOR[platform][1]
        line = (
            f"{counts[platform]} {vendor.product} device(s) present "
            f"({', '.join(sorted(sources[platform]))})"
        )
        if extensions is not None and platform in extensions:
            line += f"; {vendor.extension} {'usable' if extensions[platform] else 'missing'}"
        lines.append(line)
    return "\n".join(lines)
