"""The domestic platforms (entry-point group ``sagellm.platform``).

| name | devices | torch extension | device type | dist backend | visible-devices variable |
|---|---|---|---|---|---|
| ``ascend`` | Huawei Ascend NPU | ``torch_npu`` | ``npu`` | ``hccl`` | ``ASCEND_RT_VISIBLE_DEVICES`` |
| ``cambricon`` | Cambricon MLU | ``torch_mlu`` | ``mlu`` | ``cncl`` | ``MLU_VISIBLE_DEVICES`` |
| ``hygon`` | Hygon DCU | torch of the DTK (HIP build) | ``cuda`` | ``nccl`` (RCCL) | ``HIP_VISIBLE_DEVICES`` |
| ``kunlun`` | Kunlunxin XPU | ``torch_xmlir`` | ``xpu`` | ``bkcl`` | ``XPU_VISIBLE_DEVICES`` |
| ``metax`` | MetaX GPU | torch of MACA | ``cuda`` | ``nccl`` (MCCL) | ``CUDA_VISIBLE_DEVICES`` |

Anchor: vLLM's out-of-tree platform plugins (vllm-ascend's ``NPUPlatform`` and the
Cambricon, Kunlun, Hygon and MetaX ones): the same device types, backend names and
visible-devices variables. Difference: nothing is imported at module import; every method
imports torch and the vendor extension when it needs them, and a missing extension or
device is reported (``is_available()`` False, ``memory_info`` raising
:class:`~sagellm.core.errors.PlatformUnavailableError` with the install command), never
raised at construction.

The extension platforms (ascend, cambricon, kunlun) import the extension, which installs
its device module on torch (``torch.npu``, ``torch.mlu``; ``torch_xmlir.xpu`` or
``torch.xpu``), and call ``is_available()``, ``device_count()``, ``mem_get_info(index)``
and ``is_bf16_supported()`` on it. Hygon and MetaX ship torch builds that keep the
``torch.cuda`` API; they are told apart from AMD and NVIDIA by the HIP flag of the build
and by the vendor's devices in sysfs (or the device name).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from types import ModuleType
from typing import Any, ClassVar

from sagellm.core.errors import PlatformUnavailableError
from sagellm.domestic_interconnect.detect import VENDORS, scan_sysfs

__all__ = [
    "DOMESTIC_PLATFORM_CLASSES",
    "AscendPlatform",
    "CambriconPlatform",
    "HygonPlatform",
    "KunlunPlatform",
    "MetaxPlatform",
]

logger = logging.getLogger(__name__)

_CONSERVATIVE_DTYPES = ("float32", "float16")
_WITH_BF16 = ("float32", "float16", "bfloat16")


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None), or (None, why not) when it cannot be imported."""
    try:
        return importlib.import_module(name), None
    except ImportError:
        return None, f"{name} is not installed"
    except Exception as exc:  # a vendor extension whose native library fails to load
        return None, f"{name} failed to import ({type(exc).__name__}: {exc})"


class _Platform:
    """What every domestic platform shares: index checks, messages, sysfs counts."""

    name: ClassVar[str]
    device_type: ClassVar[str]
    dist_backend: ClassVar[str]
    visible_devices_env: ClassVar[str]
    install_hint: ClassVar[str]  # "pip install torch_npu (Huawei Ascend CANN)"

    def __init__(self, sysfs_root: str | os.PathLike[str] = "/") -> None:
        # where the sysfs tree is read when a message says how many devices are present
        self.sysfs_root = os.fspath(sysfs_root)

    # -------------------------------------------------------------- overridden
    def _device_module(self) -> tuple[Any | None, str]:
        """(the torch device module when usable, else None; why it is not)."""
        raise NotImplementedError

    # -------------------------------------------------------------- protocol
    def is_available(self) -> bool:
        """True when the torch extension imports and sees at least one device."""
        return self._device_module()[0] is not None

    def device_count(self) -> int:
        """Devices visible to this process (0 when the platform is not available)."""
        module, _ = self._device_module()
        if module is None:
            return 0
        try:
            return int(module.device_count())
        except Exception:
            logger.debug("%s: device_count() failed", self.name, exc_info=True)
            return 0

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """``(free_bytes, total_bytes)`` from the device module's ``mem_get_info``."""
        module, why = self._device_module()
        if module is None:
            raise PlatformUnavailableError(self.unavailable_message(why))
        self._check_index(device_index)
        free, total = module.mem_get_info(device_index)
        return int(free), int(total)

    def supported_dtypes(self) -> tuple[str, ...]:
        """float32 and float16, plus bfloat16 where ``is_bf16_supported()`` says so."""
        module, _ = self._device_module()
        check = getattr(module, "is_bf16_supported", None) if module is not None else None
        if check is None:
            return _CONSERVATIVE_DTYPES
        try:
            return _WITH_BF16 if bool(check()) else _CONSERVATIVE_DTYPES
        except Exception:
            return _CONSERVATIVE_DTYPES

    # -------------------------------------------------------------- shared
    def present_devices(self) -> int:
        """Devices of this platform's vendor in sysfs (needs no torch)."""
        try:
            return sum(1 for d in scan_sysfs(self.sysfs_root) if d.platform == self.name)
        except ValueError:
            return 0

    def unavailable_message(self, why: str) -> str:
        """``platform 'ascend' is not available: <why>; <install hint>`` (+ present devices)."""
        msg = f"platform {self.name!r} is not available: {why}; {self.install_hint}"
        present = self.present_devices()
        if present:
            msg += f" ({present} device(s) of this platform are present on the PCI bus)"
        return msg

    def _check_index(self, device_index: int) -> None:
        if isinstance(device_index, bool) or not isinstance(device_index, int):
            raise ValueError(f"{self.name}: device_index must be an int, got {device_index!r}")
        count = self.device_count()
        if not 0 <= device_index < count:
            raise ValueError(
                f"{self.name}: device_index {device_index} is out of range; this process "
                f"sees {count} device(s) (0..{count - 1}); check {self.visible_devices_env}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _ExtensionPlatform(_Platform):
    """A device family driven by a torch extension that adds ``torch.<attr>``."""

    extension: ClassVar[str]  # import name of the extension: "torch_npu"
    module_attr: ClassVar[str]  # "npu": torch.npu (or <extension>.npu)
    extension_first: ClassVar[bool] = False  # look at <extension>.<attr> before torch.<attr>

    def _device_module(self) -> tuple[Any | None, str]:
        torch, why = _import("torch")
        if torch is None:
            return None, why or "torch is not installed"
        ext, why = _import(self.extension)
        if ext is None:
            return None, why or f"{self.extension} is not installed"
        holders = (ext, torch) if self.extension_first else (torch, ext)
        module = None
        for holder in holders:
            module = getattr(holder, self.module_attr, None)
            if module is not None and hasattr(module, "device_count"):
                break
            module = None
        if module is None:
            return None, f"{self.extension} did not provide torch.{self.module_attr}"
        try:
            available = bool(module.is_available())
        except Exception as exc:  # a broken driver makes the query raise
            return None, f"{self.extension} could not query the devices ({exc})"
        if not available:
            return None, (
                f"{self.extension} sees no device (check the driver and {self.visible_devices_env})"
            )
        return module, ""


class AscendPlatform(_ExtensionPlatform):
    """Huawei Ascend NPUs through ``torch_npu`` (``torch.npu``); hccl for collectives."""

    name = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    install_hint = "pip install torch_npu (Huawei Ascend CANN)"
    extension = "torch_npu"
    module_attr = "npu"


class CambriconPlatform(_ExtensionPlatform):
    """Cambricon MLUs through ``torch_mlu`` (``torch.mlu``); cncl for collectives."""

    name = "cambricon"
    device_type = "mlu"
    dist_backend = "cncl"
    visible_devices_env = "MLU_VISIBLE_DEVICES"
    install_hint = "pip install torch_mlu (Cambricon Neuware SDK)"
    extension = "torch_mlu"
    module_attr = "mlu"


class KunlunPlatform(_ExtensionPlatform):
    """Kunlunxin XPUs through ``torch_xmlir`` (device ``xpu``); bkcl for collectives.

    ``torch_xmlir.xpu`` is asked first: upstream torch has its own ``torch.xpu`` (Intel
    GPUs), which reports no device for a Kunlun card.
    """

    name = "kunlun"
    device_type = "xpu"
    dist_backend = "bkcl"
    visible_devices_env = "XPU_VISIBLE_DEVICES"
    install_hint = "pip install torch_xmlir (Kunlunxin XPU SDK)"
    extension = "torch_xmlir"
    module_attr = "xpu"
    extension_first = True


class _CudaApiPlatform(_Platform):
    """A vendor torch build that keeps the ``torch.cuda`` API (HIP or CUDA flavoured)."""

    device_type = "cuda"
    dist_backend = "nccl"
    hip: ClassVar[bool]  # the vendor's torch is a HIP build (torch.version.hip set)
    device_name: ClassVar[re.Pattern[str]]  # what torch.cuda.get_device_name(0) shows

    def _vendor_id(self) -> int:
        return next(vid for vid, v in VENDORS.items() if v.platform == self.name)

    def _is_vendor_device(self, cuda: Any) -> bool:
        if self.present_devices() > 0:
            return True
        try:
            return bool(self.device_name.search(str(cuda.get_device_name(0))))
        except Exception:
            return False

    def _device_module(self) -> tuple[Any | None, str]:
        torch, why = _import("torch")
        if torch is None:
            return None, why or "torch is not installed"
        is_hip = getattr(torch.version, "hip", None) is not None
        if is_hip and not self.hip:
            return None, f"torch {torch.__version__} is a HIP (ROCm) build, not the vendor's"
        if self.hip and not is_hip:
            return None, f"torch {torch.__version__} is not a HIP build"
        cuda = torch.cuda
        try:
            available = bool(cuda.is_available())
        except Exception as exc:
            return None, f"torch could not query the devices ({exc})"
        if not available:
            return None, f"torch sees no device (check the driver and {self.visible_devices_env})"
        if not self._is_vendor_device(cuda):
            return None, "the devices torch sees are not this vendor's"
        return cuda, ""


class HygonPlatform(_CudaApiPlatform):
    """Hygon DCUs through the DTK's torch (a HIP build: ``torch.cuda``, RCCL as nccl)."""

    name = "hygon"
    visible_devices_env = "HIP_VISIBLE_DEVICES"
    install_hint = "install torch from Hygon's DTK (DCU Toolkit, a HIP build of torch)"
    hip = True
    device_name = re.compile(r"hygon|\bdcu\b", re.IGNORECASE)


class MetaxPlatform(_CudaApiPlatform):
    """MetaX GPUs through torch built for MACA (``torch.cuda``, MCCL as nccl).

    MACA also reads ``MACA_VISIBLE_DEVICES`` (:attr:`alternate_visible_devices_env`).
    """

    name = "metax"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    alternate_visible_devices_env: ClassVar[tuple[str, ...]] = ("MACA_VISIBLE_DEVICES",)
    install_hint = "install torch built for MetaX MACA (from the MACA SDK wheels)"
    hip = False
    device_name = re.compile(r"metax", re.IGNORECASE)


#: Every platform of this package, by name.
DOMESTIC_PLATFORM_CLASSES: dict[str, type[_Platform]] = {
    cls.name: cls
    for cls in (AscendPlatform, CambriconPlatform, HygonPlatform, KunlunPlatform, MetaxPlatform)
}
