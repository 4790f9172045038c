"""NVML NVLink counting (a fake NVML module) and the nvidia-smi topo -m parser."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sagellm.topology import SysfsTopologyDetector, TopologyConfig
from sagellm.topology.vendor import normalize_bus_id, nvlink_counts, parse_nvidia_smi_topo

FIXTURES = Path(__file__).parent / "fixtures"
P4D_GPUS = [
    "0000:10:1c.0", "0000:10:1d.0", "0000:20:1c.0", "0000:20:1d.0",
    "0000:90:1c.0", "0000:90:1d.0", "0000:a0:1c.0", "0000:a0:1d.0",
]  # fmt: skip

# nvidia-smi topo -m of an 8x RTX 4090 server with two NICs, as posted in
# NVIDIA/go-gpuallocator#17 (tabs as nvidia-smi prints them).
RTX4090_TOPO = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU1\tSYS\t X \tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU2\tSYS\tSYS\t X \tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU3\tSYS\tSYS\tSYS\t X \tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU4\tSYS\tSYS\tSYS\tSYS\t X \tSYS\tSYS\tSYS\tSYS\tSYS\t56-111,168-223\t1\t\tN/A
GPU5\tSYS\tSYS\tSYS\tSYS\tSYS\t X \tSYS\tSYS\tSYS\tSYS\t56-111,168-223\t1\t\tN/A
GPU6\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t X \tSYS\tPHB\tPHB\t56-111,168-223\t1\t\tN/A
GPU7\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t X \tSYS\tSYS\t56-111,168-223\t1\t\tN/A
NIC0\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tPHB\tSYS\t X \tPIX
NIC1\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\tPHB\tSYS\tPIX\t X

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
"""

# The first rows of a DGX A100's matrix (NVIDIA/nccl#1505): NV12 between every GPU pair.
DGX_A100_TOPO = (
    "\t"
    + "\t".join(f"GPU{i}" for i in range(8))
    + "\tNIC0\tCPU Affinity\n"
    + "".join(
        f"GPU{i}\t" + "\t".join(" X " if i == j else "NV12" for j in range(8)) + "\tPXB\t48-63\n"
        for i in range(8)
    )
)


def test_parse_rtx4090_matrix() -> None:
    gpus, pairs = parse_nvidia_smi_topo(RTX4090_TOPO)
    assert gpus == [f"GPU{i}" for i in range(8)]
    assert len(pairs) == 28
    assert set(pairs.values()) == {"sys"}
    assert ("GPU0", "GPU7") in pairs and ("GPU7", "GPU0") not in pairs


def test_parse_dgx_matrix() -> None:
    _, pairs = parse_nvidia_smi_topo(DGX_A100_TOPO)
    assert set(pairs.values()) == {"nv12"} and len(pairs) == 28


def test_parse_refuses_other_text() -> None:
    with pytest.raises(ValueError, match="no 'GPU0 GPU1 ...' header"):
        parse_nvidia_smi_topo("No devices were found\n")


def test_normalize_bus_id() -> None:
    assert normalize_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert normalize_bus_id(b"00000001:10:1C.0") == "0001:10:1c.0"
    with pytest.raises(ValueError, match="not a PCI bus id: 'GPU-1234'"):
        normalize_bus_id("GPU-1234")


class FakeNvml:
    """NVML's calls over a table: GPU bus ids and, per GPU, the far end of each link."""

    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_MAX_LINKS = 12

    def __init__(self, gpus: list[str], remote: dict[int, list[str]]) -> None:
        self.gpus = gpus
        self.remote = remote
        self.shutdown = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=("0000" + self.gpus[h]).upper().encode())

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if link >= len(self.remote.get(h, [])):
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> Any:
        return SimpleNamespace(busId="0000" + self.remote[h][link])


def test_nvswitch_fabric_gives_every_pair_nvlinks() -> None:
    # p4d: every A100 has 12 NVLinks, all to NVSwitches (not GPUs)
    nvml = FakeNvml(P4D_GPUS, {i: [f"0000:c{k % 6}:00.0" for k in range(12)] for i in range(8)})
    counts = nvlink_counts(nvml)
    assert len(counts) == 28 and set(counts.values()) == {12}
    assert nvml.shutdown
    detector = SysfsTopologyDetector(TopologyConfig(root=str(FIXTURES / "aws-p4d-8gpu")), nvml=nvml)
    info = detector.detect()
    assert info.nvlink is True
    assert {(kind, gbps) for _, _, kind, gbps in info.links} == {("nvlink", 240.0)}
    assert set(info.link_latency_us) == {3.4}


def test_direct_links_count_both_ends_once() -> None:
    a, b, c = P4D_GPUS[:3]
    # a-b joined by 2 links, b-c by 1; each end reports its links
    nvml = FakeNvml([a, b, c], {0: [b, b], 1: [a, a, c], 2: [b]})
    assert nvlink_counts(nvml) == {(a, b): 2, (b, c): 1}


def test_nvml_without_a_driver_gives_nothing() -> None:
    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    assert nvlink_counts(NoDriver(P4D_GPUS, {})) == {}
