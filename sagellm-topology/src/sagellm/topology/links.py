"""From a :class:`Machine` to core's :class:`TopologyInfo`: devices, NUMA, link costs.

Accelerator pairs get NCCL's path types (nvidia-smi's legend): ``nvlink`` (from NVML or
``nvidia-smi topo -m``), else ``pix`` (one PCIe switch or bridge between them), ``pxb``
(several bridges, no host bridge), ``phb`` (through one host bridge), ``node`` (two
host bridges of one NUMA node), ``sys`` (across the inter-socket link). Each link's
bandwidth is the narrowest PCIe hop on the path (a device's own link and every bridge's,
as NCCL takes the minimum of a device and its parent), capped by the inter-socket prior
for ``sys``; its latency is NCCL's prior for the link family.
"""

from __future__ import annotations

from collections.abc import Mapping

from sagellm.core.types import TopologyInfo
from sagellm.topology.costs import (
    LATENCY_US,
    NVLINK_BW_PER_LINK,
    LinkCost,
    inter_socket_gbps,
    pcie_gbps,
)
from sagellm.topology.machine import Machine, PciDevice

__all__ = ["path_type", "to_topology_info"]


def _chain(machine: Machine, dev: PciDevice) -> list[PciDevice]:
    """The device and its bridges up to the root complex (device first)."""
    by_addr = {d.address: d for d in machine.pci_devices}
    out = [dev]
    seen = {dev.address}
    parent = dev.parent
    while parent is not None and parent in by_addr and parent not in seen:
        seen.add(parent)
        out.append(by_addr[parent])
        parent = by_addr[parent].parent
    return out


def path_type(machine: Machine, a: PciDevice, b: PciDevice) -> str:
    """NCCL's PCIe path type between two functions: pix, pxb, phb, node or sys."""
    if a.numa_node >= 0 and b.numa_node >= 0 and a.numa_node != b.numa_node:
        return "sys"
    up_a = [d.address for d in _chain(machine, a)][1:]  # bridges above a, nearest first
    up_b = [d.address for d in _chain(machine, b)][1:]
    common = next((i for i, addr in enumerate(up_a) if addr in up_b), None)
    if common is not None:
        below = max(common, up_b.index(up_a[common]))  # bridges below the shared one
        return "pix" if below <= 1 else "pxb"
    if a.root == b.root:
        return "phb"
    return "node"


def _path_gbps(machine: Machine, a: PciDevice, b: PciDevice) -> float:
    hops = _chain(machine, a) + _chain(machine, b)
    return min(pcie_gbps(d.link_speed_gts, d.link_width) for d in hops)


def to_topology_info(
    machine: Machine,
    *,
    nvlinks: Mapping[tuple[str, str], int] | None = None,
    smi_links: Mapping[tuple[str, str], str] | None = None,
    nvlink_gbps_per_link: float = NVLINK_BW_PER_LINK,
    shm_cost: LinkCost | None = None,
) -> TopologyInfo:
    """Core's summary of ``machine``.

    ``nvlinks`` maps a pair of PCI addresses (sorted) to its NVLink count (NVML);
    ``smi_links`` maps a pair to the path type an SMI tool reported (``nv12``, ``pix``,
    ...), which wins over the sysfs path where the two disagree. ``shm_cost`` replaces
    the prior of the intra-node shared-memory link on a machine without accelerators.
    """
    nodes = machine.numa_nodes
    # a node without a distance file makes the whole matrix unknown
    distances = tuple(n.distances for n in nodes) if all(n.distances for n in nodes) else ()
    qpi = inter_socket_gbps(machine.cpu_vendor)
    accel = machine.accelerators
    if not accel:
        shm = shm_cost or LinkCost(alpha_us=LATENCY_US["pcie"], beta_gbps=pcie_gbps(None, None))
        links: list[tuple[int, int, str, float]] = []
        latency: list[float] = []
        ids = [n.id for n in nodes] or [0]
        for i, na in enumerate(ids):
            for nb in ids[i:]:
                if na == nb:
                    links.append((na, nb, "shm", shm.beta_gbps))
                    latency.append(shm.alpha_us)
                else:
                    links.append((na, nb, "numa", qpi))
                    latency.append(LATENCY_US["pcie"])
        cpu_ids = [c.id for c in machine.cpus]
        per_node = tuple(n.cpus for n in nodes) if nodes else (tuple(cpu_ids),)
        return TopologyInfo(
            num_devices=len(cpu_ids),
            device_type="cpu",
            numa_nodes=per_node,
            links=tuple(links),
            nvlink=False,
            numa_distances=distances,
            device_numa=tuple(c.numa_node for c in machine.cpus),
            link_latency_us=tuple(latency),
        )

    # the most numerous accelerator platform; ties go to the first in PCI order
    counts: dict[str, int] = {}
    for d in accel:
        counts[d.platform] = counts.get(d.platform, 0) + 1
    platform = max(counts, key=lambda p: (counts[p], -[d.platform for d in accel].index(p)))
    devices = [d for d in accel if d.platform == platform]
    nvlinks = nvlinks or {}
    smi_links = smi_links or {}
    links = []
    latency = []
    for i, a in enumerate(devices):
        for j in range(i + 1, len(devices)):
            b = devices[j]
            key = (a.address, b.address)
            count = nvlinks.get(key, 0)
            reported = smi_links.get(key, "")
            if not count and reported.startswith("nv") and reported[2:].isdigit():
                count = int(reported[2:])
            if count:
                links.append((i, j, "nvlink", count * nvlink_gbps_per_link))
                latency.append(LATENCY_US["nvlink"])
                continue
            kind = reported if reported in ("pix", "pxb", "phb", "node", "sys") else ""
            kind = kind or path_type(machine, a, b)
            gbps = _path_gbps(machine, a, b)
            if kind == "sys":
                gbps = min(gbps, qpi)
            links.append((i, j, kind, gbps))
            latency.append(LATENCY_US["pcie"])
    node_ids = [n.id for n in nodes]
    per_node = tuple(
        tuple(k for k, d in enumerate(devices) if d.numa_node == nid) for nid in node_ids
    )
    return TopologyInfo(
        num_devices=len(devices),
        device_type=platform,
        numa_nodes=per_node,
        links=tuple(links),
        nvlink=any(kind == "nvlink" for _, _, kind, _ in links),
        numa_distances=distances,
        device_numa=tuple(d.numa_node for d in devices),
        link_latency_us=tuple(latency),
    )
