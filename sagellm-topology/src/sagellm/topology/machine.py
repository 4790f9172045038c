"""What a sysfs scan finds: plain frozen records, comparable and JSON-serialisable.

:class:`Machine` is the full result of :func:`sagellm.topology.sysfs.read_machine`;
:meth:`Machine.to_dict` gives the form the fixtures' expected files are written in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ACCELERATOR_VENDORS",
    "Cache",
    "Cpu",
    "InfinibandPort",
    "Machine",
    "Nic",
    "NumaNode",
    "PciDevice",
]

#: PCI vendor id -> (vendor name, sageLLM platform name) of accelerator makers.
ACCELERATOR_VENDORS: dict[int, tuple[str, str]] = {
    0x10DE: ("nvidia", "cuda"),
    0x1002: ("amd", "rocm"),
    0x19E5: ("huawei", "ascend"),
    0xCABC: ("cambricon", "cambricon"),
    0x1D94: ("hygon", "hygon"),
    0x9999: ("metax", "metax"),
    0x1D22: ("kunlun", "kunlun"),
    0x1ED5: ("moorethreads", "musa"),
}


@dataclass(frozen=True, slots=True)
class Cpu:
    """One online logical CPU."""

    id: int  # kernel cpu number
    package_id: int  # socket (physical_package_id); -1 when the kernel gives none
    core_id: int  # core inside the package; -1 when unknown
    numa_node: int  # NUMA node holding it; -1 without NUMA information


@dataclass(frozen=True, slots=True)
class Cache:
    """One cache instance (deduplicated over the CPUs that share it)."""

    level: int  # 1, 2, 3, ...
    kind: str  # "data", "instruction" or "unified"
    size_kib: int  # capacity in KiB
    cpus: tuple[int, ...]  # CPUs sharing it (shared_cpu_list)


@dataclass(frozen=True, slots=True)
class NumaNode:
    """One NUMA node."""

    id: int  # node number
    cpus: tuple[int, ...]  # its CPUs (cpulist); empty for memory-only nodes
    memory_kib: int  # MemTotal of the node; 0 when meminfo is absent
    distances: tuple[int, ...]  # SLIT row, one entry per node in id order


@dataclass(frozen=True, slots=True)
class PciDevice:
    """One PCI function."""

    address: str  # domain:bus:device.function, e.g. "0000:3b:00.0"
    vendor_id: int  # PCI vendor id (0x10de NVIDIA, ...)
    device_id: int  # PCI device id; -1 when absent
    class_id: int  # 24-bit class code (0x030200 3D controller, 0x020000 Ethernet, ...)
    numa_node: int  # numa_node file; -1 when the firmware gives none (VMs)
    parent: str | None  # upstream PCI bridge; None when on a root complex
    root: str  # root complex, e.g. "pci0000:00"
    link_speed_gts: float | None  # max_link_speed in GT/s (None: not exposed)
    link_width: int | None  # max_link_width in lanes (None: not exposed)
    vendor: str = ""  # accelerator vendor name when the vendor makes accelerators
    platform: str = ""  # sageLLM platform of an accelerator, "" for other devices

    @property
    def is_accelerator(self) -> bool:
        """A display/3D/processing-accelerator function of an accelerator vendor."""
        return bool(self.platform) and (self.class_id >> 16) in (0x03, 0x12)

    @property
    def is_bridge(self) -> bool:
        """A PCI-to-PCI bridge (switch port or root port)."""
        return (self.class_id >> 8) == 0x0604


@dataclass(frozen=True, slots=True)
class Nic:
    """One network interface backed by a device (virtual interfaces are left out)."""

    name: str  # interface name (eth0, ib0, ...)
    speed_mbps: int | None  # /sys/class/net/<name>/speed; None when unknown (-1, virtio)
    pci_address: str | None  # PCI function behind it, None for non-PCI devices


@dataclass(frozen=True, slots=True)
class InfinibandPort:
    """One port of an RDMA device under /sys/class/infiniband."""

    device: str  # mlx5_0, ...
    port: int  # port number (1-based)
    rate_gbps: float | None  # "rate" file, e.g. 100 for "100 Gb/sec (4X EDR)"
    state: str  # "ACTIVE", "DOWN", ... ("" when absent)
    link_layer: str  # "InfiniBand" or "Ethernet" ("" when absent)
    pci_address: str | None  # PCI function behind the device


@dataclass(frozen=True, slots=True)
class Machine:
    """Everything a sysfs scan found, sorted by id/address."""

    cpus: tuple[Cpu, ...]
    caches: tuple[Cache, ...]
    numa_nodes: tuple[NumaNode, ...]
    pci_devices: tuple[PciDevice, ...]
    nics: tuple[Nic, ...]
    infiniband: tuple[InfinibandPort, ...]
    cpu_vendor: str = ""  # vendor_id of /proc/cpuinfo (GenuineIntel, AuthenticAMD, ...)
    notes: tuple[str, ...] = field(default=())  # what was missing or odd, for humans

    @property
    def accelerators(self) -> tuple[PciDevice, ...]:
        """Accelerator functions, in PCI address order."""
        return tuple(d for d in self.pci_devices if d.is_accelerator)

    @property
    def num_packages(self) -> int:
        """Distinct sockets among the CPUs."""
        return len({c.package_id for c in self.cpus})

    def pci(self, address: str) -> PciDevice:
        """The PCI function at ``address``; KeyError naming it when absent."""
        for d in self.pci_devices:
            if d.address == address:
                return d
        raise KeyError(f"no PCI device {address} on this machine")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and dicts (tuples become lists), for JSON."""
        return asdict(self)
