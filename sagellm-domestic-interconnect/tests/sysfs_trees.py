"""Fixture sysfs trees built in a temporary folder: PCI functions of every vendor."""

from __future__ import annotations

from pathlib import Path

# (address, vendor, device, class, numa_node)
PciFunction = tuple[str, int, int, int, int]

#: A machine with every domestic vendor's accelerators and the same vendors' other functions.
MIXED: tuple[PciFunction, ...] = (
    ("0000:00:00.0", 0x1D94, 0x1450, 0x060000, 0),  # Hygon CPU root complex: not a DCU
    ("0000:00:00.2", 0x1D94, 0x1451, 0x080600, 0),  # Hygon IOMMU
    ("0000:01:00.0", 0x19E5, 0x0200, 0x020000, 0),  # Huawei Hi1822 NIC
    ("0000:02:00.0", 0x19E5, 0xA250, 0x120000, 0),  # HiSilicon ZIP engine: not an NPU
    ("0000:3b:00.0", 0x19E5, 0xD802, 0x120000, 0),  # Ascend 910B
    ("0000:3c:00.0", 0x19E5, 0xD802, 0x120000, 1),  # Ascend 910B
    ("0000:41:00.0", 0xCABC, 0x0370, 0x120000, 1),  # Cambricon MLU370-S4
    ("0000:51:00.0", 0x1D94, 0x6211, 0x038000, 1),  # Hygon K100 DCU
    ("0000:61:00.0", 0x1D22, 0x3684, 0x120000, -1),  # Kunlun accelerator
    ("0000:71:00.0", 0x9999, 0x0A01, 0x030200, 1),  # MetaX C500
    ("0000:81:00.0", 0x10DE, 0x20B0, 0x030200, 1),  # NVIDIA A100: core's cuda platform
    ("0000:82:00.0", 0x1002, 0x740F, 0x038000, 1),  # AMD MI210: core's rocm platform
    ("0000:90:00.0", 0x8086, 0x1572, 0x020000, 0),  # Intel NIC
)


def build_tree(root: Path, functions: tuple[PciFunction, ...] | list[PciFunction]) -> Path:
    """Write ``sys/bus/pci/devices/<address>/{vendor,device,class,numa_node}`` under root."""
    bus = root / "sys" / "bus" / "pci" / "devices"
    bus.mkdir(parents=True, exist_ok=True)
    for address, vendor, device, klass, node in functions:
        d = bus / address
        d.mkdir()
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "class").write_text(f"0x{klass:06x}\n")
        (d / "numa_node").write_text(f"{node}\n")
    return root


def many(n: int) -> list[PciFunction]:
    """``n`` Ascend NPUs among ``3 * n`` other functions (the benchmark's tree)."""
    out: list[PciFunction] = []
    for i in range(4 * n):
        bus = i // 8
        fn = i % 8
        address = f"0000:{bus:02x}:{fn:02x}.0"
        if i % 4 == 0:
            out.append((address, 0x19E5, 0xD801, 0x120000, i % 2))
        else:
            out.append((address, 0x8086, 0x1572, 0x020000, i % 2))
    return out
