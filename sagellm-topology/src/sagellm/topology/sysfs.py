"""Reads a Linux sysfs/procfs tree (the live one or a copy under another root).

Every path is taken relative to ``root``, so a fixture tree rebuilt from a public dump
reads exactly like the machine it came from. Symbolic links are resolved inside the
root (an absolute target is re-rooted), never against the host's own ``/sys``.

What is read, and nothing else:

- ``sys/devices/system/cpu/online``, ``cpu<N>/topology/{physical_package_id,core_id}``,
  ``cpu<N>/cache/index<M>/{level,type,size,shared_cpu_list}``;
- ``sys/devices/system/node/node<N>/{cpulist,distance,meminfo}``;
- ``sys/bus/pci/devices/<addr>`` (the link gives the bridge chain) and its
  ``{vendor,device,class,numa_node,max_link_speed,max_link_width}``;
- ``sys/class/net/<if>`` (link) and ``speed``; ``sys/class/infiniband/<dev>`` (link) and
  ``ports/<n>/{rate,state,link_layer}``;
- the first ``vendor_id`` line of ``proc/cpuinfo``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from sagellm.topology.machine import (
    ACCELERATOR_VENDORS,
    Cache,
    Cpu,
    InfinibandPort,
    Machine,
    Nic,
    NumaNode,
    PciDevice,
)

__all__ = ["SysfsReader", "parse_cpulist", "parse_link_speed", "parse_size_kib", "read_machine"]

_PCI_ADDR = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_ROOT_COMPLEX = re.compile(r"^pci[0-9a-f]{4,8}:[0-9a-f]{2}$")
_NUMBERED = re.compile(r"^(cpu|node|index)(\d+)$")


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> ``(0, 1, 2, 3, 8, 10, 11)``; an empty string gives ``()``.

    Raises ``ValueError`` naming the text for anything else (a reversed range included).
    """
    out: list[int] = []
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. '0-3,8')")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"not a CPU list: {text!r} (range {part} is reversed)")
        out.extend(range(a, b + 1))
    return tuple(sorted(set(out)))


def parse_size_kib(text: str) -> int:
    """A cache ``size`` file (``"32K"``, ``"8192K"``, ``"1M"``, ``"512"`` bytes) in KiB."""
    t = text.strip().upper()
    m = re.fullmatch(r"(\d+)\s*([KMG]?)", t)
    if m is None:
        raise ValueError(f"not a cache size: {text!r} (expected e.g. '32K')")
    value, unit = int(m.group(1)), m.group(2)
    scale = {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024 * 1024}[unit]
    return int(value * scale)


def parse_link_speed(text: str) -> float | None:
    """``max_link_speed`` (``"8 GT/s"``, ``"16.0 GT/s PCIe"``, ``"2.5 GT/s"``) in GT/s.

    ``"Unknown speed"`` (what the kernel writes for a link it cannot read) gives None.
    """
    m = re.match(r"\s*(\d+(?:\.\d+)?)\s*GT/s", text)
    return float(m.group(1)) if m else None


_PCI_ATTRS = ("vendor", "device", "class", "numa_node", "max_link_speed", "max_link_width")


def _to_int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _numbered(names: Iterable[str], prefix: str) -> list[tuple[int, str]]:
    out = []
    for name in names:
        m = _NUMBERED.match(name)
        if m and m.group(1) == prefix:
            out.append((int(m.group(2)), name))
    return sorted(out)


class SysfsReader:
    """Reads one root. ``trace`` (a set) collects every path read, relative to the root.

    The trace is how the fixtures were trimmed to the files this reader needs.
    """

    def __init__(self, root: str | os.PathLike[str] = "/", *, trace: set[str] | None = None):
        self.root = os.path.abspath(os.fspath(root))
        self.trace = trace
        if not os.path.isdir(self._path("sys")):
            raise ValueError(
                f"{self.root} holds no sys/ folder: pass the root of a sysfs tree "
                "(the folder that contains sys/ and proc/, '/' for this machine)"
            )

    # ------------------------------------------------------------------ file access
    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _note(self, rel: str) -> None:
        if self.trace is not None:
            self.trace.add(rel)

    def read(self, rel: str) -> str | None:
        """Contents of a file (stripped), None when absent or unreadable."""
        # os.open/os.read: a sysfs attribute is one small read, and the buffered text
        # layer of open() costs more than the read itself across ~1000 files
        try:
            fd = os.open(os.path.join(self.root, rel), os.O_RDONLY)
        except OSError:
            return None
        try:
            data = os.read(fd, 65536)
        except OSError:
            return None
        finally:
            os.close(fd)
        self._note(rel)
        return data.decode("utf-8", "replace").strip()

    def read_dir(self, rel: str, names: tuple[str, ...]) -> dict[str, str]:
        """Several attributes of one folder (one directory open, one path walk)."""
        out: dict[str, str] = {}
        try:
            dfd = os.open(os.path.join(self.root, rel), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return out
        try:
            for name in names:
                try:
                    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    continue
                finally:
                    os.close(fd)
                out[name] = data.decode("utf-8", "replace").strip()
                self._note(f"{rel}/{name}")
        finally:
            os.close(dfd)
        return out

    def read_int(self, rel: str, base: int = 10) -> int | None:
        text = self.read(rel)
        if text is None:
            return None
        try:
            return int(text, base)
        except ValueError:
            return None

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(rel)))
        except OSError:
            return []

    def resolve(self, rel: str) -> str | None:
        """Follow the symlink at ``rel`` inside the root; its target relative to the root."""
        full = self._path(rel)
        try:
            target = os.readlink(full)
        except OSError:
            return rel if os.path.exists(full) else None
        self._note(rel)
        if os.path.isabs(target):
            joined = os.path.normpath(target.lstrip("/"))
        else:
            joined = os.path.normpath(os.path.join(os.path.dirname(rel), target))
        return joined

    # ------------------------------------------------------------------ sections
    def cpus_online(self) -> tuple[int, ...]:
        online = self.read("sys/devices/system/cpu/online")
        if online is not None:
            return parse_cpulist(online)
        return tuple(n for n, _ in _numbered(self.listdir("sys/devices/system/cpu"), "cpu"))

    def numa_nodes(self) -> tuple[NumaNode, ...]:
        base = "sys/devices/system/node"
        nodes = []
        for n, name in _numbered(self.listdir(base), "node"):
            cpus = parse_cpulist(self.read(f"{base}/{name}/cpulist") or "")
            dist_text = self.read(f"{base}/{name}/distance") or ""
            distances = tuple(int(x) for x in dist_text.split())
            memory = 0
            meminfo = self.read(f"{base}/{name}/meminfo") or ""
            m = re.search(r"MemTotal:\s*(\d+)\s*kB", meminfo)
            if m:
                memory = int(m.group(1))
            nodes.append(NumaNode(id=n, cpus=cpus, memory_kib=memory, distances=distances))
        return tuple(nodes)

    def cpus_and_caches(
        self, online: tuple[int, ...], nodes: tuple[NumaNode, ...]
    ) -> tuple[tuple[Cpu, ...], tuple[Cache, ...]]:
        node_of = {c: node.id for node in nodes for c in node.cpus}
        cpus = []
        caches: dict[tuple[int, str, tuple[int, ...]], Cache] = {}
        for c in online:
            base = f"sys/devices/system/cpu/cpu{c}"
            topo = self.read_dir(f"{base}/topology", ("physical_package_id", "core_id"))
            package = _to_int(topo.get("physical_package_id"))
            core = _to_int(topo.get("core_id"))
            cpus.append(
                Cpu(
                    id=c,
                    package_id=-1 if package is None else package,
                    core_id=-1 if core is None else core,
                    numa_node=node_of.get(c, -1),
                )
            )
            for _, name in _numbered(self.listdir(f"{base}/cache"), "index"):
                idx = f"{base}/cache/{name}"
                attrs = self.read_dir(idx, ("level", "type", "shared_cpu_list"))
                level = _to_int(attrs.get("level"))
                kind = attrs.get("type", "").lower()
                shared = attrs.get("shared_cpu_list")
                if level is None or not kind:
                    continue
                sharers = parse_cpulist(shared) if shared else (c,)
                key = (level, kind, sharers)
                if key in caches:  # seen from another CPU sharing it: size already read
                    continue
                size = self.read(f"{idx}/size")
                if size is not None:
                    caches[key] = Cache(
                        level=level, kind=kind, size_kib=parse_size_kib(size), cpus=sharers
                    )
        ordered = sorted(caches.values(), key=lambda k: (k.level, k.kind, k.cpus))
        return tuple(cpus), tuple(ordered)

    def _pci_chain(self, rel_target: str) -> tuple[str, list[str]]:
        """Root complex and PCI addresses from the root down to the device itself."""
        parts = rel_target.split("/")
        root = ""
        chain: list[str] = []
        for part in parts:
            if _ROOT_COMPLEX.match(part):
                root, chain = part, []
            elif root and _PCI_ADDR.match(part):
                chain.append(part)
        return root, chain

    def pci_devices(self) -> tuple[PciDevice, ...]:
        base = "sys/bus/pci/devices"
        out = []
        for addr in self.listdir(base):
            if not _PCI_ADDR.match(addr):
                continue
            rel = f"{base}/{addr}"
            target = self.resolve(rel) or rel
            root, chain = self._pci_chain(target)
            if not root:
                # not a link into devices/pciDDDD:BB (flat copies): domain and bus as root
                root = "pci" + addr[: addr.rindex(":")]
                chain = [addr]
            parent = chain[-2] if len(chain) >= 2 else None
            attrs = self.read_dir(rel, _PCI_ATTRS)
            vendor_id = _to_int(attrs.get("vendor"), 16)
            class_id = _to_int(attrs.get("class"), 16)
            device_id = _to_int(attrs.get("device"), 16)
            numa = _to_int(attrs.get("numa_node"))
            speed_text = attrs.get("max_link_speed")
            width = _to_int(attrs.get("max_link_width"))
            vendor, platform = ACCELERATOR_VENDORS.get(vendor_id or -1, ("", ""))
            out.append(
                PciDevice(
                    address=addr,
                    vendor_id=-1 if vendor_id is None else vendor_id,
                    device_id=-1 if device_id is None else device_id,
                    class_id=-1 if class_id is None else class_id,
                    numa_node=-1 if numa is None else numa,
                    parent=parent,
                    root=root,
                    link_speed_gts=None if speed_text is None else parse_link_speed(speed_text),
                    link_width=width if width else None,
                    vendor=vendor,
                    platform=platform,
                )
            )
        return tuple(out)

    def _device_pci(self, rel_link: str) -> tuple[bool, str | None]:
        """(is backed by a device, PCI function) of a class link such as net/eth0."""
        target = self.resolve(rel_link)
        if target is None or "/virtual/" in f"/{target}/":
            return False, None
        _, chain = self._pci_chain(target)
        return True, chain[-1] if chain else None

    def nics(self) -> tuple[Nic, ...]:
        base = "sys/class/net"
        out = []
        for name in self.listdir(base):
            real, pci = self._device_pci(f"{base}/{name}")
            if not real:
                continue
            speed = self.read_int(f"{base}/{name}/speed")
            out.append(
                Nic(name=name, speed_mbps=speed if speed and speed > 0 else None, pci_address=pci)
            )
        return tuple(out)

    def infiniband(self) -> tuple[InfinibandPort, ...]:
        base = "sys/class/infiniband"
        out = []
        for dev in self.listdir(base):
            _, pci = self._device_pci(f"{base}/{dev}")
            for port in self.listdir(f"{base}/{dev}/ports"):
                if not port.isdigit():
                    continue
                p = f"{base}/{dev}/ports/{port}"
                rate_text = self.read(f"{p}/rate") or ""
                m = re.match(r"\s*(\d+(?:\.\d+)?)\s*Gb/sec", rate_text)
                state = self.read(f"{p}/state") or ""
                # "4: ACTIVE" -> "ACTIVE"
                state = state.split(":", 1)[-1].strip()
                out.append(
                    InfinibandPort(
                        device=dev,
                        port=int(port),
                        rate_gbps=float(m.group(1)) if m else None,
                        state=state,
                        link_layer=self.read(f"{p}/link_layer") or "",
                        pci_address=pci,
                    )
                )
        return tuple(sorted(out, key=lambda p: (p.device, p.port)))

    def cpu_vendor(self) -> str:
        try:
            with open(self._path("proc/cpuinfo"), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("vendor_id"):
                        self._note("proc/cpuinfo")
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return ""

    def machine(self) -> Machine:
        """Scan every section."""
        notes = []
        nodes = self.numa_nodes()
        if not nodes:
            notes.append("no NUMA nodes in sys/devices/system/node: one node assumed")
        online = self.cpus_online()
        cpus, caches = self.cpus_and_caches(online, nodes)
        pci = self.pci_devices()
        if pci and all(d.numa_node < 0 for d in pci):
            notes.append("every PCI numa_node is -1 (a VM or a single-node firmware)")
        return Machine(
            cpus=cpus,
            caches=caches,
            numa_nodes=nodes,
            pci_devices=pci,
            nics=self.nics(),
            infiniband=self.infiniband(),
            cpu_vendor=self.cpu_vendor(),
            notes=tuple(notes),
        )


def read_machine(root: str | os.PathLike[str] = "/", *, trace: set[str] | None = None) -> Machine:
    """Scan the sysfs/procfs tree under ``root`` (``/`` for this machine)."""
    return SysfsReader(root, trace=trace).machine()
