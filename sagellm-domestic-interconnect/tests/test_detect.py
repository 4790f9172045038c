"""Detection from fixture sysfs trees and from captured SMI output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from sysfs_trees import MIXED, build_tree

from sagellm.domestic_interconnect import DetectedDevice, detect, scan_sysfs, smi_tools, summarize
from sagellm.domestic_interconnect.detect import is_accelerator, parse_smi_count


def _no_tools(name: str) -> str | None:
    return None


def test_mixed_tree_gives_exactly_the_domestic_accelerators(tmp_path: Path) -> None:
    root = build_tree(tmp_path, MIXED)
    assert detect(root, which=_no_tools) == [
        DetectedDevice("ascend", "huawei", "0000:3b:00.0", 0x19E5, 0xD802, 0),
        DetectedDevice("ascend", "huawei", "0000:3c:00.0", 0x19E5, 0xD802, 1),
        DetectedDevice("cambricon", "cambricon", "0000:41:00.0", 0xCABC, 0x0370, 1),
        DetectedDevice("hygon", "hygon", "0000:51:00.0", 0x1D94, 0x6211, 1),
        DetectedDevice("kunlun", "kunlun", "0000:61:00.0", 0x1D22, 0x3684, -1),
        DetectedDevice("metax", "metax", "0000:71:00.0", 0x9999, 0x0A01, 1),
    ]


def test_summary_says_which_extension_is_missing(tmp_path: Path) -> None:
    devices = detect(build_tree(tmp_path, MIXED), use_smi=False)
    assert summarize(devices, {"ascend": False, "cambricon": True}) == "\n".join(
        [
            "2 Ascend NPU device(s) present (sysfs); torch_npu missing",
            "1 Cambricon MLU device(s) present (sysfs); torch_mlu usable",
            "1 Hygon DCU device(s) present (sysfs)",
            "1 Kunlun XPU device(s) present (sysfs)",
            "1 MetaX GPU device(s) present (sysfs)",
        ]
    )
    assert summarize([]) == "no domestic accelerators found"


def test_one_vendor_per_tree(tmp_path: Path) -> None:
    for i, (address, vendor, device, klass, node) in enumerate(MIXED):
        root = build_tree(tmp_path / str(i), [(address, vendor, device, klass, node)])
        got = scan_sysfs(root)
        assert len(got) == int(is_accelerator(vendor, device, klass)), address


@pytest.mark.parametrize(
    ("vendor", "device", "klass", "expected"),
    [
        (0x19E5, 0xD100, 0x120000, True),  # Ascend 310
        (0x19E5, 0xD500, 0x120000, True),  # Ascend 310P
        (0x19E5, 0xA255, 0x120000, False),  # HiSilicon SEC engine
        (0x19E5, 0xD801, 0x020000, False),  # right id, NIC class
        (0xCABC, 0x0270, 0x0B4000, True),  # co-processor class
        (0x1D94, 0x1456, 0x108000, False),  # Hygon PSP crypto
        (0x10DE, 0x20B0, 0x030200, False),  # NVIDIA: not this package's
    ],
)
def test_is_accelerator(vendor: int, device: int, klass: int, expected: bool) -> None:
    assert is_accelerator(vendor, device, klass) is expected


def test_root_without_pci_bus_gives_nothing(tmp_path: Path) -> None:
    assert scan_sysfs(tmp_path) == []


def test_root_that_is_not_a_folder_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="is not a folder"):
        detect(missing)


def test_unreadable_files_are_skipped_not_guessed(tmp_path: Path) -> None:
    root = build_tree(tmp_path, [("0000:3b:00.0", 0x19E5, 0xD802, 0x120000, 0)])
    dev = root / "sys/bus/pci/devices/0000:3b:00.0"
    (dev / "numa_node").unlink()
    (dev / "device").write_text("garbage\n")
    # unknown device id: an Ascend needs its id range, so it is not counted
    assert scan_sysfs(root) == []
    (dev / "device").write_text("0xd802\n")
    assert scan_sysfs(root) == [
        DetectedDevice("ascend", "huawei", "0000:3b:00.0", 0x19E5, 0xD802, -1)
    ]


NPU_SMI_INFO_L = """\
        Total Count                    : 2

        NPU ID                         : 0
        Product Name                   : IT21PDDA01

        NPU ID                         : 1
        Product Name                   : IT21PDDA01
"""


def test_smi_counts_when_sysfs_shows_nothing(tmp_path: Path) -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []

    def which(name: str) -> str | None:
        return "/usr/local/bin/npu-smi" if name == "npu-smi" else None

    def run(path: str, args: Sequence[str]) -> str | None:
        calls.append((path, tuple(args)))
        return NPU_SMI_INFO_L

    got = detect(tmp_path, which=which, run=run)
    assert calls == [("/usr/local/bin/npu-smi", ("info", "-l"))]
    assert got == [
        DetectedDevice("ascend", "huawei", "", 0x19E5, -1, -1, "smi:npu-smi"),
        DetectedDevice("ascend", "huawei", "", 0x19E5, -1, -1, "smi:npu-smi"),
    ]
    assert summarize(got, {"ascend": False}) == (
        "2 Ascend NPU device(s) present (smi:npu-smi); torch_npu missing"
    )


def test_smi_is_not_asked_when_sysfs_has_the_vendor(tmp_path: Path) -> None:
    root = build_tree(tmp_path, [("0000:3b:00.0", 0x19E5, 0xD802, 0x120000, 0)])

    def run(path: str, args: Sequence[str]) -> str | None:
        raise AssertionError("sysfs already shows the Ascend devices")

    got = detect(root, which=lambda n: f"/bin/{n}" if n == "npu-smi" else None, run=run)
    assert [d.source for d in got] == ["sysfs"]


def test_failed_or_unrecognised_smi_output_adds_nothing(tmp_path: Path) -> None:
    def which(name: str) -> str | None:
        return f"/bin/{name}"

    assert detect(tmp_path, which=which, run=lambda p, a: None) == []
    assert detect(tmp_path, which=which, run=lambda p, a: "no devices\n") == []


def test_smi_tools_found_on_path() -> None:
    found = smi_tools(lambda n: f"/opt/bin/{n}" if n in ("cnmon", "mx-smi") else None)
    assert found == {"cnmon": "/opt/bin/cnmon", "mx-smi": "/opt/bin/mx-smi"}


def test_parse_smi_count() -> None:
    assert parse_smi_count("npu-smi", NPU_SMI_INFO_L) == 2
    assert parse_smi_count("cnmon", "Card 0\n  Product: MLU370\nCard 1\n  Product: MLU370\n") == 2
    assert parse_smi_count("mx-smi", "GPU#0 MetaX C500\nGPU#1 MetaX C500\nGPU#2 MetaX C500\n") == 3
    assert parse_smi_count("mx-smi", "") is None
    assert parse_smi_count("unknown-tool", "whatever") is None


def test_live_machine_detection_runs() -> None:
    # this machine has no domestic accelerator; the call must still work on the real /sys
    assert all(isinstance(d, DetectedDevice) for d in detect("/", use_smi=False))
