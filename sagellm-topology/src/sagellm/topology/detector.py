"""The ``sysfs`` topology detector (entry point ``sagellm.topology: sysfs``)."""

from __future__ import annotations

import os
from typing import ClassVar

from sagellm.core.types import TopologyInfo
from sagellm.topology.config import TopologyConfig
from sagellm.topology.costs import LinkCost, fit_alpha_beta, measure_shm_pingpong
from sagellm.topology.links import to_topology_info
from sagellm.topology.machine import Machine
from sagellm.topology.sysfs import read_machine
from sagellm.topology.vendor import (
    find_smi_tools,
    load_nvml,
    nvlink_counts,
    parse_nvidia_smi_topo,
    run_nvidia_smi_topo,
)

__all__ = ["SysfsTopologyDetector", "calibrate_shm"]

#: Message sizes of the shared-memory calibration.
CALIBRATION_SIZES = (4096, 65536, 1 << 20, 4 << 20)


def calibrate_shm(sizes: tuple[int, ...] = CALIBRATION_SIZES, repeats: int = 20) -> LinkCost:
    """Alpha-beta of this machine's shared-memory link, fitted to a two-process ping-pong."""
    return fit_alpha_beta(sizes, measure_shm_pingpong(sizes, repeats=repeats))


class SysfsTopologyDetector:
    """Reads sysfs (any root), adds NVML/SMI link facts, returns core's TopologyInfo.

    ``detect()`` scans once per call (nothing is cached: devices can be hot-plugged);
    :attr:`machine` keeps the last full scan, :attr:`smi_tools` the SMI tools found.
    """

    config_class: ClassVar[type[TopologyConfig]] = TopologyConfig

    def __init__(self, config: TopologyConfig | None = None, *, nvml: object = None) -> None:
        self.config = config or TopologyConfig()
        self._nvml = nvml  # a module with NVML's functions; None = pynvml when installed
        self.machine: Machine | None = None
        self.smi_tools: dict[str, str] = {}
        self.shm_cost: LinkCost | None = None

    def detect(self) -> TopologyInfo:
        """Scan the tree under ``config.root`` and summarise it (see the protocol)."""
        root = self.config.root
        if not os.path.isdir(root):
            raise ValueError(
                f"topology root {root!r} is not a folder: set root to '/' or a sysfs copy"
            )
        machine = read_machine(root)
        self.machine = machine
        vendors = {d.vendor for d in machine.accelerators}
        nvlinks: dict[tuple[str, str], int] = {}
        smi_links: dict[tuple[str, str], str] = {}
        live = os.path.realpath(root) == "/"
        if "nvidia" in vendors and self.config.use_nvml:
            nvml = self._nvml if self._nvml is not None else (load_nvml() if live else None)
            if nvml is not None:
                nvlinks = nvlink_counts(nvml)
        self.smi_tools = find_smi_tools(vendors) if live else {}
        if self.config.use_smi and "nvidia-smi" in self.smi_tools and not nvlinks:
            names, pairs = parse_nvidia_smi_topo(run_nvidia_smi_topo(self.smi_tools["nvidia-smi"]))
            gpus = [d.address for d in machine.accelerators if d.vendor == "nvidia"]
            if len(names) == len(gpus):  # nvidia-smi numbers GPUs in PCI order
                index = {f"GPU{i}": addr for i, addr in enumerate(gpus)}
                smi_links = {(index[a], index[b]): kind for (a, b), kind in pairs.items()}
        if self.config.calibrate and not machine.accelerators:
            self.shm_cost = calibrate_shm()
        return to_topology_info(
            machine,
            nvlinks=nvlinks,
            smi_links=smi_links,
            nvlink_gbps_per_link=self.config.nvlink_gbps_per_link,
            shm_cost=self.shm_cost,
        )
