"""Device platforms: what a device family offers and how to reach it.

Three platforms are built in: ``cpu``, ``cuda`` (NVIDIA) and ``rocm`` (AMD, through
torch's HIP build). Others (``ascend``, ``cambricon``, ``hygon``, ``kunlun``, ``metax``) are
installed by ``sagellm-domestic-interconnect`` under the ``sagellm.platform`` entry-point
group and found through :mod:`sagellm.core.registry`.

Anchor: vLLM ``vllm/platforms`` (one class per device family with ``device_type``,
``dist_backend`` and a visible-devices variable). Difference: no torch at import time —
every method imports torch only when it needs it, so ``sagellm.core`` works (and reports
the CPU) in an environment without torch.

Usage::

    from sagellm.core.platforms import current_platform, get_platform

    p = current_platform()              # cuda if present, else rocm, else a plugin, else cpu
    free, total = p.memory_info(0)
    get_platform("ascend")              # PlatformUnavailableError naming the package to install
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from sagellm.core import registry
from sagellm.core.errors import PlatformUnavailableError, PluginNotFoundError
from sagellm.core.protocols import Platform

__all__ = [
    "BUILTIN_PLATFORMS",
    "DOMESTIC_PLATFORMS",
    "CpuPlatform",
    "CudaPlatform",
    "RocmPlatform",
    "current_platform",
    "get_platform",
    "host_memory_info",
    "list_platforms",
    "reset_cache",
]

logger = logging.getLogger(__name__)

#: Platforms provided by sagellm-domestic-interconnect (``pip install 'sagellm[comm]'``).
DOMESTIC_PLATFORMS = ("ascend", "cambricon", "hygon", "kunlun", "metax")

_DOMESTIC_DIST = "sagellm-domestic-interconnect"
_DOMESTIC_EXTRA = "comm"

# cgroup v1 reports "no limit" as a huge number (a page-rounded 2**63 - 1)
_NO_CGROUP_LIMIT = 1 << 60


def _torch() -> ModuleType | None:
    """torch, or None when it is not installed (or deliberately hidden)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _check_index(platform: Platform, device_index: int) -> None:
    count = platform.device_count()
    if isinstance(device_index, bool) or not isinstance(device_index, int):
        raise ValueError(f"{platform.name}: device_index must be an int, got {device_index!r}")
    if not 0 <= device_index < count:
        raise ValueError(
            f"{platform.name}: device_index {device_index} is out of range; this process "
            f"sees {count} device(s) (0..{count - 1}); check {platform.visible_devices_env}"
        )


# --------------------------------------------------------------------------- cpu


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo(path: Path = Path("/proc/meminfo")) -> tuple[int, int] | None:
    """``(available, total)`` bytes from /proc/meminfo, or None when unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            values[key.strip()] = int(parts[0]) * scale
    total = values.get("MemTotal")
    if total is None:
        return None
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return available, total


def _sysconf_memory() -> tuple[int, int] | None:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (AttributeError, OSError, ValueError):
        return None
    if total <= 0:
        return None
    return max(0, available), total


def _cgroup_limit(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """``(limit, usage)`` bytes of this process's memory cgroup, or None when unlimited."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # cgroup v1
    ):
        limit = _read_int(root / limit_file)
        if limit is None or limit >= _NO_CGROUP_LIMIT:
            continue
        usage = _read_int(root / usage_file) or 0
        return limit, usage
    return None


def host_memory_info() -> tuple[int, int]:
    """``(free_bytes, total_bytes)`` of host memory this process may use.

    ``MemAvailable`` and ``MemTotal`` of /proc/meminfo (``os.sysconf`` where there is no
    /proc), narrowed to the memory cgroup's limit when a container sets one.
    """
    info = _meminfo() or _sysconf_memory()
    if info is None:
        raise PlatformUnavailableError(
            "cannot read the host memory size (no /proc/meminfo and no os.sysconf pages)"
        )
    free, total = info
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limit, usage = cgroup
        total = min(total, limit)
        free = min(free, max(0, limit - usage))
    return min(free, total), total


class CpuPlatform:
    """The host CPU: one device, gloo for collectives, host memory as device memory.

    ``visible_devices_env`` is ``CPU_VISIBLE_MEMORY_NODES`` (NUMA nodes a rank may use,
    vLLM's name), so a launcher can treat every platform alike.
    """

    name: str = "cpu"
    device_type: str = "cpu"
    dist_backend: str = "gloo"
    visible_devices_env: str = "CPU_VISIBLE_MEMORY_NODES"

    def is_available(self) -> bool:
        """Always True."""
        return True

    def device_count(self) -> int:
        """Always 1: torch addresses the host as the single device ``cpu``."""
        return 1

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """``(free_bytes, total_bytes)`` of host memory (see :func:`host_memory_info`)."""
        _check_index(self, device_index)
        return host_memory_info()

    def supported_dtypes(self) -> tuple[str, ...]:
        """float32, bfloat16 and float16 (torch computes all three on x86 and Arm)."""
        return ("float32", "bfloat16", "float16")

    def __repr__(self) -> str:
        return "CpuPlatform()"


# --------------------------------------------------------------------------- cuda / rocm


class _TorchCudaPlatform:
    """A device family torch exposes as ``torch.cuda`` (NVIDIA CUDA or AMD HIP builds)."""

    name: str
    device_type: str = "cuda"
    dist_backend: str = "nccl"
    visible_devices_env: str
    _hip: bool  # True for torch's ROCm (HIP) build

    def _cuda(self) -> Any | None:
        torch = _torch()
        if torch is None:
            return None
        is_hip = getattr(torch.version, "hip", None) is not None
        if is_hip is not self._hip:
            return None
        try:
            if not torch.cuda.is_available():
                return None
        except Exception:  # a broken driver makes the query raise: treat as absent
            logger.debug("torch.cuda.is_available() failed", exc_info=True)
            return None
        return torch.cuda

    def is_available(self) -> bool:
        """True when torch is installed for this device family and sees a device."""
        return self._cuda() is not None

    def device_count(self) -> int:
        """Devices visible to this process (0 when unavailable)."""
        cuda = self._cuda()
        return int(cuda.device_count()) if cuda is not None else 0

    def memory_info(self, device_index: int = 0) -> tuple[int, int]:
        """``(free_bytes, total_bytes)`` from ``torch.cuda.mem_get_info``."""
        cuda = self._cuda()
        if cuda is None:
            raise PlatformUnavailableError(self._unavailable_message())
        _check_index(self, device_index)
        free, total = cuda.mem_get_info(device_index)
        return int(free), int(total)

    def supported_dtypes(self) -> tuple[str, ...]:
        """float32 and float16, plus bfloat16 where the device computes it."""
        cuda = self._cuda()
        if cuda is None:
            return ("float32", "float16", "bfloat16")
        try:
            bf16 = bool(cuda.is_bf16_supported())
        except Exception:
            bf16 = False
        return ("float32", "float16", "bfloat16") if bf16 else ("float32", "float16")

    def _unavailable_message(self) -> str:
        torch = _torch()
        if torch is None:
            return f"platform {self.name!r} needs torch, which is not installed"
        build = "ROCm" if self._hip else "CUDA"
        return (
            f"platform {self.name!r} is not available: torch {torch.__version__} sees no "
            f"{build} device (check the driver, the torch build and {self.visible_devices_env})"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CudaPlatform(_TorchCudaPlatform):
    """NVIDIA GPUs through torch's CUDA build; nccl for collectives."""

    name = "cuda"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    _hip = False


class RocmPlatform(_TorchCudaPlatform):
    """AMD GPUs through torch's ROCm build (device type ``cuda``); RCCL under the nccl name."""

    name = "rocm"
    visible_devices_env = "HIP_VISIBLE_DEVICES"
    _hip = True


# --------------------------------------------------------------------------- lookup

#: The platforms of sagellm-core itself, by name.
BUILTIN_PLATFORMS: dict[str, type[Platform]] = {
    "cpu": CpuPlatform,
    "cuda": CudaPlatform,
    "rocm": RocmPlatform,
}

_lock = threading.Lock()
_instances: dict[str, Platform] = {}


def _plugin_names() -> list[str]:
    return [p.name for p in registry.available("platform") if p.allowed]


def _unknown_message(name: str) -> str:
    known = ", ".join(list_platforms())
    if name in DOMESTIC_PLATFORMS:
        return (
            f"platform {name!r} is not installed; it is provided by {_DOMESTIC_DIST}: "
            f"pip install 'sagellm[{_DOMESTIC_EXTRA}]' (installed platforms: {known})"
        )
    return (
        f"unknown platform {name!r}; installed platforms: {known}; "
        f"{', '.join(DOMESTIC_PLATFORMS)} come from {_DOMESTIC_DIST} "
        f"(pip install 'sagellm[{_DOMESTIC_EXTRA}]')"
    )


def _build_plugin(name: str) -> Platform:
    try:
        obj = registry.load_class("platform", name)
    except PluginNotFoundError as exc:
        if name in [p.name for p in registry.available("platform")]:  # excluded by allow-list
            raise PlatformUnavailableError(str(exc)) from exc
        raise PlatformUnavailableError(_unknown_message(name)) from exc
    platform = registry.load("platform", name) if isinstance(obj, type) else obj
    if not isinstance(platform, Platform):
        raise PlatformUnavailableError(
            f"the sagellm.platform entry point {name!r} gave {type(platform).__name__}, "
            "which does not implement sagellm.core.protocols.Platform"
        )
    return platform


def get_platform(name: str) -> Platform:
    """The platform called ``name`` (built-in first, then the ``sagellm.platform`` group).

    One instance per name and process. Raises :class:`PlatformUnavailableError` for a
    name nothing provides (naming the package that does, for the domestic accelerators),
    and :class:`~sagellm.core.errors.PluginLoadError` when the providing plugin fails to
    import. The platform may still report ``is_available() == False`` on this machine.
    """
    key = name.strip().lower()
    with _lock:
        cached = _instances.get(key)
    if cached is not None:
        return cached
    builtin = BUILTIN_PLATFORMS.get(key)
    platform = builtin() if builtin is not None else _build_plugin(key)
    with _lock:
        return _instances.setdefault(key, platform)


def list_platforms() -> list[str]:
    """Built-in platform names, then installed (and allowed) plugin names, without repeats."""
    names = list(BUILTIN_PLATFORMS)
    names.extend(n for n in _plugin_names() if n not in names)
    return names


def current_platform() -> Platform:
    """The platform this process should run on.

    CUDA when available, else ROCm, else the first installed plugin platform (by name)
    that reports a device, else the CPU. A plugin that fails to load is logged and
    skipped here (``python -m sagellm.core`` shows its error).
    """
    for name in ("cuda", "rocm"):
        p = get_platform(name)
        if p.is_available():
            return p
    for name in _plugin_names():
        if name in BUILTIN_PLATFORMS:
            continue
        try:
            p = get_platform(name)
            if p.is_available():
                return p
        except Exception as exc:  # third-party code: report, do not fail the whole engine
            logger.warning("platform plugin %r is unusable: %s", name, exc)
    return get_platform("cpu")


def reset_cache() -> None:
    """Forget built platform instances (tests that install plugins at run time)."""
    with _lock:
        _instances.clear()
