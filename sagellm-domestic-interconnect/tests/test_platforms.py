"""The platforms against stand-in vendor extensions, and without them (this machine)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import FakeDeviceModule, extension
from sysfs_trees import MIXED, build_tree

from sagellm.core import registry
from sagellm.core.errors import PlatformUnavailableError
from sagellm.core.platforms import get_platform, list_platforms, reset_cache
from sagellm.core.protocols import Platform
from sagellm.domestic_interconnect import (
    DOMESTIC_PLATFORM_CLASSES,
    AscendPlatform,
    CambriconPlatform,
    HygonPlatform,
    KunlunPlatform,
    MetaxPlatform,
)

ATTRIBUTES = {
    "ascend": ("npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES"),
    "cambricon": ("mlu", "cncl", "MLU_VISIBLE_DEVICES"),
    "hygon": ("cuda", "nccl", "HIP_VISIBLE_DEVICES"),
    "kunlun": ("xpu", "bkcl", "XPU_VISIBLE_DEVICES"),
    "metax": ("cuda", "nccl", "CUDA_VISIBLE_DEVICES"),
}


@pytest.mark.parametrize("name", sorted(ATTRIBUTES))
def test_attributes(name: str) -> None:
    p = DOMESTIC_PLATFORM_CLASSES[name]()
    assert isinstance(p, Platform)
    assert (p.name, p.device_type, p.dist_backend, p.visible_devices_env) == (
        name,
        *ATTRIBUTES[name],
    )


def test_metax_also_names_maca_visible_devices() -> None:
    assert MetaxPlatform.alternate_visible_devices_env == ("MACA_VISIBLE_DEVICES",)


def test_registered_under_sagellm_platform() -> None:
    registry.reset_cache()
    reset_cache()
    assert set(ATTRIBUTES) <= set(list_platforms())
    for name, cls in DOMESTIC_PLATFORM_CLASSES.items():
        assert type(get_platform(name)) is cls
    reset_cache()


# ----------------------------------------------------------------- missing extensions

MISSING: dict[type[Any], str] = {
    AscendPlatform: "platform 'ascend' is not available: torch_npu is not installed; "
    "pip install torch_npu (Huawei Ascend CANN)",
    CambriconPlatform: "platform 'cambricon' is not available: torch_mlu is not installed; "
    "pip install torch_mlu (Cambricon Neuware SDK)",
    KunlunPlatform: "platform 'kunlun' is not available: torch_xmlir is not installed; "
    "pip install torch_xmlir (Kunlunxin XPU SDK)",
}


@pytest.fixture
def no_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("torch_npu", "torch_mlu", "torch_xmlir"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError


@pytest.mark.usefixtures("no_extensions")
@pytest.mark.parametrize("cls", list(MISSING), ids=lambda c: c.name)
def test_missing_extension(cls: type[Any], tmp_path: Path) -> None:
    p = cls(sysfs_root=tmp_path)
    assert p.is_available() is False
    assert p.device_count() == 0
    assert p.supported_dtypes() == ("float32", "float16")
    with pytest.raises(PlatformUnavailableError) as info:
        p.memory_info(0)
    assert str(info.value) == MISSING[cls]


@pytest.mark.usefixtures("no_extensions")
def test_missing_extension_says_how_many_devices_are_present(tmp_path: Path) -> None:
    p = AscendPlatform(sysfs_root=build_tree(tmp_path, MIXED))
    with pytest.raises(PlatformUnavailableError) as info:
        p.memory_info(0)
    assert str(info.value) == (
        MISSING[AscendPlatform] + " (2 device(s) of this platform are present on the PCI bus)"
    )


def test_extension_that_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "torch_mlu.py").write_text("raise OSError('libcnrt.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_mlu", raising=False)
    p = CambriconPlatform(sysfs_root=tmp_path)
    with pytest.raises(PlatformUnavailableError) as info:
        p.memory_info(0)
    assert str(info.value) == (
        "platform 'cambricon' is not available: torch_mlu failed to import "
        "(OSError: libcnrt.so: cannot open); pip install torch_mlu (Cambricon Neuware SDK)"
    )
    monkeypatch.delitem(sys.modules, "torch_mlu", raising=False)


def test_hygon_and_metax_on_this_cpu_build(tmp_path: Path) -> None:
    with pytest.raises(PlatformUnavailableError) as info:
        HygonPlatform(sysfs_root=tmp_path).memory_info(0)
    assert str(info.value) == (
        f"platform 'hygon' is not available: torch {torch.__version__} is not a HIP build; "
        "install torch from Hygon's DTK (DCU Toolkit, a HIP build of torch)"
    )
    with pytest.raises(PlatformUnavailableError) as info:
        MetaxPlatform(sysfs_root=tmp_path).memory_info(0)
    assert str(info.value) == (
        "platform 'metax' is not available: torch sees no device (check the driver and "
        "CUDA_VISIBLE_DEVICES); install torch built for MetaX MACA (from the MACA SDK wheels)"
    )


# ----------------------------------------------------------------- stand-in extensions


@pytest.fixture
def fake_npu(monkeypatch: pytest.MonkeyPatch) -> FakeDeviceModule:
    """torch_npu as it behaves: importing it puts ``npu`` on torch."""
    npu = FakeDeviceModule("torch.npu", count=2, memory={0: (30 << 30, 64 << 30), 1: (5, 9)})
    monkeypatch.setitem(sys.modules, "torch_npu", extension("torch_npu", npu=npu))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return npu


def test_ascend_calls_torch_npu(fake_npu: FakeDeviceModule) -> None:
    p = AscendPlatform()
    assert p.is_available() is True
    assert p.device_count() == 2
    assert p.memory_info(0) == (30 << 30, 64 << 30)
    assert p.memory_info(1) == (5, 9)
    assert p.supported_dtypes() == ("float32", "float16", "bfloat16")
    assert set(fake_npu.names()) == {
        "is_available",
        "device_count",
        "mem_get_info",
        "is_bf16_supported",
    }
    assert [c for c in fake_npu.calls if c[0] == "mem_get_info"] == [
        ("mem_get_info", (0,)),
        ("mem_get_info", (1,)),
    ]


def test_ascend_index_checks(fake_npu: FakeDeviceModule) -> None:
    p = AscendPlatform()
    with pytest.raises(ValueError) as info:
        p.memory_info(2)
    assert str(info.value) == (
        "ascend: device_index 2 is out of range; this process sees 2 device(s) (0..1); "
        "check ASCEND_RT_VISIBLE_DEVICES"
    )
    with pytest.raises(ValueError, match="out of range"):
        p.memory_info(-1)
    with pytest.raises(ValueError, match="must be an int"):
        p.memory_info(True)


def test_ascend_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    npu = FakeDeviceModule("torch.npu", bf16=False)  # e.g. an Ascend 310P
    monkeypatch.setitem(sys.modules, "torch_npu", extension("torch_npu", npu=npu))
    monkeypatch.delattr(torch, "npu", raising=False)
    # only torch_npu.npu here: the platform finds the device module there too
    p = AscendPlatform()
    assert p.supported_dtypes() == ("float32", "float16")
    assert p.device_count() == 2


def test_extension_without_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    npu = FakeDeviceModule("torch.npu", count=0, available=False)
    monkeypatch.setitem(sys.modules, "torch_npu", extension("torch_npu", npu=npu))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    p = AscendPlatform(sysfs_root=tmp_path)
    assert (p.is_available(), p.device_count()) == (False, 0)
    with pytest.raises(PlatformUnavailableError) as info:
        p.memory_info(0)
    assert str(info.value) == (
        "platform 'ascend' is not available: torch_npu sees no device (check the driver "
        "and ASCEND_RT_VISIBLE_DEVICES); pip install torch_npu (Huawei Ascend CANN)"
    )


def test_extension_that_adds_no_device_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_mlu", extension("torch_mlu"))
    monkeypatch.delattr(torch, "mlu", raising=False)
    with pytest.raises(PlatformUnavailableError, match="torch_mlu did not provide torch.mlu"):
        CambriconPlatform().memory_info(0)


def test_cambricon_calls_torch_mlu(monkeypatch: pytest.MonkeyPatch) -> None:
    mlu = FakeDeviceModule("torch.mlu", count=4, bf16=False)
    monkeypatch.setitem(sys.modules, "torch_mlu", extension("torch_mlu"))
    monkeypatch.setattr(torch, "mlu", mlu, raising=False)
    p = CambriconPlatform()
    assert (p.is_available(), p.device_count()) == (True, 4)
    assert p.memory_info(3) == (4 << 30, 64 << 30)
    assert p.supported_dtypes() == ("float32", "float16")
    assert ("mem_get_info", (3,)) in mlu.calls


def test_kunlun_prefers_torch_xmlir_xpu(monkeypatch: pytest.MonkeyPatch) -> None:
    xpu = FakeDeviceModule("torch_xmlir.xpu", count=8)
    monkeypatch.setitem(sys.modules, "torch_xmlir", extension("torch_xmlir", xpu=xpu))
    p = KunlunPlatform()
    # torch.xpu (upstream, Intel) exists in this torch and sees nothing; it is not used
    assert (p.is_available(), p.device_count()) == (True, 8)
    assert p.memory_info(7) == (8 << 30, 64 << 30)
    assert p.supported_dtypes() == ("float32", "float16", "bfloat16")


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, *, hip: str | None, name: str) -> list[int]:
    asked: list[int] = []

    def mem_get_info(i: int) -> tuple[int, int]:
        asked.append(i)
        return (7 << 30, 32 << 30)

    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    return asked


def test_hygon_on_a_hip_build_with_hygon_devices(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    asked = _fake_cuda(monkeypatch, hip="6.2.41134", name="K100")
    p = HygonPlatform(sysfs_root=build_tree(tmp_path, MIXED))
    assert (p.is_available(), p.device_count()) == (True, 4)
    assert p.memory_info(2) == (7 << 30, 32 << 30)
    assert asked == [2]
    assert p.supported_dtypes() == ("float32", "float16", "bfloat16")
    # without the sysfs tree, the device name decides
    assert HygonPlatform(sysfs_root=tmp_path / "sys").is_available() is False
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "DCU K100")
    assert HygonPlatform(sysfs_root=tmp_path / "sys").is_available() is True


def test_hygon_does_not_claim_amd_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_cuda(monkeypatch, hip="6.2.41134", name="AMD Instinct MI210")
    p = HygonPlatform(sysfs_root=tmp_path)
    assert p.is_available() is False
    with pytest.raises(PlatformUnavailableError) as info:
        p.memory_info(0)
    assert str(info.value) == (
        "platform 'hygon' is not available: the devices torch sees are not this vendor's; "
        "install torch from Hygon's DTK (DCU Toolkit, a HIP build of torch)"
    )
    assert MetaxPlatform(sysfs_root=tmp_path).is_available() is False  # HIP: not MACA


def test_metax_on_a_maca_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    asked = _fake_cuda(monkeypatch, hip=None, name="MetaX C500")
    p = MetaxPlatform(sysfs_root=tmp_path)
    assert (p.is_available(), p.device_count()) == (True, 4)
    assert p.memory_info(3) == (7 << 30, 32 << 30)
    assert asked == [3]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-80GB")
    assert MetaxPlatform(sysfs_root=tmp_path).is_available() is False
