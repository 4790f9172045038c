"""Stand-ins for vendor torch extensions, injected into ``sys.modules`` (test isolation).

Each records the calls made on its device module so a test can check that the platform
asks the real API names (``is_available``, ``device_count``, ``mem_get_info``,
``is_bf16_supported``) and hands their values back unchanged.
"""

from __future__ import annotations

import types
from typing import Any


class FakeDeviceModule(types.ModuleType):
    """``torch.npu`` / ``torch.mlu`` / ``torch_xmlir.xpu`` as far as a platform uses it."""

    def __init__(
        self,
        name: str,
        *,
        count: int = 2,
        memory: dict[int, tuple[int, int]] | None = None,
        bf16: bool = True,
        available: bool = True,
    ) -> None:
        super().__init__(name)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._count = count
        self._memory = memory or {i: ((i + 1) << 30, 64 << 30) for i in range(count)}
        self._bf16 = bf16
        self._available = available

    def is_available(self) -> bool:
        self.calls.append(("is_available", ()))
        return self._available

    def device_count(self) -> int:
        self.calls.append(("device_count", ()))
        return self._count

    def mem_get_info(self, device: int) -> tuple[int, int]:
        self.calls.append(("mem_get_info", (device,)))
        return self._memory[device]

    def is_bf16_supported(self) -> bool:
        self.calls.append(("is_bf16_supported", ()))
        return self._bf16

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def extension(name: str, **attrs: Any) -> types.ModuleType:
    """A module called ``name`` carrying ``attrs`` (e.g. ``npu=FakeDeviceModule(...)``)."""
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module
