"""What vendor tools add to sysfs: NVLink counts from NVML, path types from SMI tools.

NVML (``pynvml``, from the ``nvidia-ml-py`` distribution) is used only when installed; it
is passed in as a module so tests can hand a fake one. SMI tools are looked up on
``PATH``; only ``nvidia-smi topo -m`` is parsed (its matrix is the one documented
format), the others are reported as present.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Mapping
from types import ModuleType
from typing import Any

__all__ = [
    "SMI_TOOLS",
    "find_smi_tools",
    "load_nvml",
    "normalize_bus_id",
    "nvlink_counts",
    "parse_nvidia_smi_topo",
    "run_nvidia_smi_topo",
]

#: Vendor -> the SMI tools that report its devices.
SMI_TOOLS: Mapping[str, tuple[str, ...]] = {
    "nvidia": ("nvidia-smi",),
    "amd": ("amd-smi", "rocm-smi"),
    "huawei": ("npu-smi",),
    "cambricon": ("cnmon",),
    "hygon": ("hy-smi",),
    "kunlun": ("xpu-smi",),
    "metax": ("mx-smi",),
}


def normalize_bus_id(bus_id: str | bytes) -> str:
    """NVML's ``00000000:3B:00.0`` -> sysfs's ``0000:3b:00.0``."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    text = text.strip().lower()
    m = re.fullmatch(r"([0-9a-f]+):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])", text)
    if m is None:
        raise ValueError(f"not a PCI bus id: {bus_id!r} (expected e.g. 00000000:3B:00.0)")
    domain = int(m.group(1), 16)
    return f"{domain:04x}:{m.group(2)}:{m.group(3)}.{m.group(4)}"


def load_nvml() -> ModuleType | None:
    """The ``pynvml`` module when installed, else None (nothing is imported then)."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    return importlib.import_module("pynvml")


def nvlink_counts(nvml: Any) -> dict[tuple[str, str], int]:
    """Active NVLinks per GPU pair (sorted PCI addresses), from an NVML module.

    A link whose far end is not a GPU (an NVSwitch) counts towards that GPU's switch
    links; two GPUs that both reach switches are joined by the smaller of their switch
    link counts, as NCCL treats an NVSwitch fabric. An NVML error (no driver) gives {}.
    """
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError subclasses: no driver, no permission
        return {}
    try:
        gpus: dict[str, Any] = {}
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            gpus[normalize_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)] = handle
        pairs: dict[tuple[str, str], int] = {}
        to_switch: dict[str, int] = {}
        max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))
        enabled = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
        for addr, handle in gpus.items():
            for link in range(max_links):
                try:
                    if nvml.nvmlDeviceGetNvLinkState(handle, link) != enabled:
                        continue
                    remote = normalize_bus_id(
                        nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId
                    )
                except Exception:  # link index not supported on this GPU
                    continue
                if remote in gpus:
                    if addr < remote:  # each direction is reported by both ends
                        key = (addr, remote)
                        pairs[key] = pairs.get(key, 0) + 1
                else:
                    to_switch[addr] = to_switch.get(addr, 0) + 1
        switched = sorted(to_switch)
        for i, a in enumerate(switched):
            for b in switched[i + 1 :]:
                pairs[(a, b)] = pairs.get((a, b), 0) + min(to_switch[a], to_switch[b])
        return pairs
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def find_smi_tools(vendors: set[str] | None = None) -> dict[str, str]:
    """SMI tool name -> path for the tools on PATH (of ``vendors``, or every vendor)."""
    out = {}
    for vendor, tools in SMI_TOOLS.items():
        if vendors is not None and vendor not in vendors:
            continue
        for tool in tools:
            path = shutil.which(tool)
            if path:
                out[tool] = path
    return out


def parse_nvidia_smi_topo(text: str) -> tuple[list[str], dict[tuple[str, str], str]]:
    """The GPU-to-GPU part of ``nvidia-smi topo -m``: (GPU names, {(GPUi, GPUj): type}).

    Types are lowercased (``nv12``, ``pix``, ``pxb``, ``phb``, ``node``, ``sys``) and
    keyed by the sorted pair of names; rows other than GPUs (NICs) and the affinity
    columns are ignored. Text without a GPU header raises ``ValueError``.
    """
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    header_at = next((i for i, line in enumerate(lines) if re.match(r"^\s+GPU0\b", line)), None)
    if header_at is None:
        raise ValueError("no 'GPU0 GPU1 ...' header in the nvidia-smi topo -m output")
    columns = lines[header_at].split()
    gpus = [c for c in columns if re.fullmatch(r"GPU\d+", c)]
    out: dict[tuple[str, str], str] = {}
    for line in lines[header_at + 1 :]:
        cells = line.split()
        if not cells or not re.fullmatch(r"GPU\d+", cells[0]):
            if cells and cells[0] == "Legend:":
                break
            continue
        row = cells[0]
        for col, value in zip(columns, cells[1:]):
            if col not in gpus or col == row:
                continue
            a, b = sorted((row, col), key=lambda g: int(g[3:]))
            out[(a, b)] = value.lower()
    return gpus, out


def run_nvidia_smi_topo(path: str, timeout_s: float = 10.0) -> str:
    """Output of ``nvidia-smi topo -m`` (raises ``RuntimeError`` with its stderr on failure)."""
    done = subprocess.run(
        [path, "topo", "-m"], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{path} topo -m failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout
