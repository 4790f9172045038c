"""Parsing of sysfs files and the quirks of virtual machines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagellm.topology import SysfsTopologyDetector, TopologyConfig, read_machine
from sagellm.topology.sysfs import parse_cpulist, parse_link_speed, parse_size_kib


def _format_cpulist(cpus: list[int]) -> str:
    """The kernel's form: sorted runs joined by commas."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


@given(st.lists(st.integers(0, 4096), max_size=64))
def test_cpulist_round_trips(cpus: list[int]) -> None:
    assert parse_cpulist(_format_cpulist(cpus)) == tuple(sorted(set(cpus)))


def test_cpulist_examples_and_errors() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpulist("") == ()
    with pytest.raises(ValueError, match=r"not a CPU list: '3-1' \(range 3-1 is reversed\)"):
        parse_cpulist("3-1")
    with pytest.raises(ValueError, match=r"not a CPU list: 'a'"):
        parse_cpulist("a")


def test_sizes_and_speeds() -> None:
    assert parse_size_kib("32K") == 32
    assert parse_size_kib("8192K") == 8192
    assert parse_size_kib("1M") == 1024
    assert parse_size_kib("2048") == 2
    with pytest.raises(ValueError, match="not a cache size: '32 kB'"):
        parse_size_kib("32 kB")
    assert parse_link_speed("8 GT/s") == 8.0
    assert parse_link_speed("16.0 GT/s PCIe") == 16.0
    assert parse_link_speed("2.5 GT/s") == 2.5
    assert parse_link_speed("Unknown speed") is None


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _vm_tree(root: Path) -> None:
    """A KVM guest like this project's machines: virtio only, numa_node -1, speed -1."""
    _write(root, "sys/devices/system/cpu/online", "0-1")
    for c in (0, 1):
        _write(root, f"sys/devices/system/cpu/cpu{c}/topology/physical_package_id", "0")
        _write(root, f"sys/devices/system/cpu/cpu{c}/topology/core_id", str(c))
    _write(root, "sys/devices/system/node/node0/cpulist", "0-1")
    _write(root, "sys/devices/system/node/node0/distance", "10")
    for addr, vendor, cls in (
        ("0000:00:00.0", "0x8086", "0x060000"),
        ("0000:00:03.0", "0x1af4", "0x020000"),
    ):
        dev = root / "sys/devices/pci0000:00" / addr
        _write(root, f"sys/devices/pci0000:00/{addr}/vendor", vendor)
        _write(root, f"sys/devices/pci0000:00/{addr}/class", cls)
        _write(root, f"sys/devices/pci0000:00/{addr}/numa_node", "-1")
        link = root / "sys/bus/pci/devices" / addr
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(dev, link.parent), link)
    net = root / "sys/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0"
    _write(root, "sys/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0/speed", "-1")
    (root / "sys/devices/virtual/net/lo").mkdir(parents=True)
    (root / "sys/class/net").mkdir(parents=True)
    os.symlink(os.path.relpath(net, root / "sys/class/net"), root / "sys/class/net/eth0")
    os.symlink("../../devices/virtual/net/lo", root / "sys/class/net/lo")


def test_virtual_machine_quirks(tmp_path: Path) -> None:
    _vm_tree(tmp_path)
    m = read_machine(tmp_path)
    assert [(c.id, c.package_id, c.core_id, c.numa_node) for c in m.cpus] == [
        (0, 0, 0, 0),
        (1, 0, 1, 0),
    ]
    assert [(d.address, d.numa_node, d.link_speed_gts, d.link_width) for d in m.pci_devices] == [
        ("0000:00:00.0", -1, None, None),
        ("0000:00:03.0", -1, None, None),
    ]
    # lo is virtual and left out; eth0's speed -1 (virtio) is unknown, not -1 Mb/s
    assert [(n.name, n.speed_mbps, n.pci_address) for n in m.nics] == [
        ("eth0", None, "0000:00:03.0")
    ]
    assert m.infiniband == ()
    assert m.caches == ()
    assert m.notes == ("every PCI numa_node is -1 (a VM or a single-node firmware)",)
    info = SysfsTopologyDetector(TopologyConfig(root=str(tmp_path))).detect()
    assert (info.device_type, info.num_devices, info.numa_nodes) == ("cpu", 2, ((0, 1),))
    assert info.links == ((0, 0, "shm", 12.0),)


def test_absolute_links_stay_inside_the_root(tmp_path: Path) -> None:
    _vm_tree(tmp_path)
    link = tmp_path / "sys/bus/pci/devices/0000:00:03.0"
    link.unlink()
    os.symlink("/sys/devices/pci0000:00/0000:00:03.0", link)  # absolute, as some dumps hold
    m = read_machine(tmp_path)
    assert m.pci("0000:00:03.0").root == "pci0000:00"
    assert m.pci("0000:00:03.0").vendor_id == 0x1AF4


def test_a_root_without_sys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no sys/ folder: pass the root of a sysfs tree"):
        read_machine(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        SysfsTopologyDetector(TopologyConfig(root=str(tmp_path / "missing"))).detect()


def test_unknown_pci_address_raises_key_error(tmp_path: Path) -> None:
    _vm_tree(tmp_path)
    with pytest.raises(KeyError, match="no PCI device 0000:99:00.0 on this machine"):
        read_machine(tmp_path).pci("0000:99:00.0")


def test_trace_lists_only_files_read(tmp_path: Path) -> None:
    _vm_tree(tmp_path)
    trace: set[str] = set()
    read_machine(tmp_path, trace=trace)
    assert "sys/devices/system/node/node0/cpulist" in trace
    assert "sys/bus/pci/devices/0000:00:03.0/vendor" in trace
    assert all((tmp_path / p).exists() or os.path.islink(tmp_path / p) for p in trace)
