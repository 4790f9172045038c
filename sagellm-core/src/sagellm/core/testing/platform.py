"""Conformance suite of :class:`sagellm.core.protocols.Platform`."""

from __future__ import annotations

from typing import Any

import pytest

from sagellm.core.errors import PlatformUnavailableError
from sagellm.core.protocols import Platform
from sagellm.core.types import DTYPE_BYTES

__all__ = ["PlatformConformance"]


class PlatformConformance:
    """Behaviour every platform shares. Subclass it and implement :meth:`make_platform`.

    On a machine without the device, the suite checks that the platform says so
    (``is_available()`` False, no devices, ``memory_info`` raising
    :class:`~sagellm.core.errors.PlatformUnavailableError`).
    """

    def make_platform(self) -> Any:
        """The platform under test (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_platform()")

    def test_is_platform(self) -> None:
        p = self.make_platform()
        assert isinstance(p, Platform)
        for attr in ("name", "device_type", "dist_backend", "visible_devices_env"):
            value = getattr(p, attr)
            assert isinstance(value, str) and value, f"{attr} must be a non-empty string"
        assert p.name == p.name.lower()

    def test_availability_and_device_count_agree(self) -> None:
        p = self.make_platform()
        available = p.is_available()
        assert isinstance(available, bool)
        count = p.device_count()
        assert isinstance(count, int)
        if available:
            assert count >= 1
        else:
            assert count == 0

    def test_supported_dtypes(self) -> None:
        dtypes = self.make_platform().supported_dtypes()
        assert isinstance(dtypes, tuple) and dtypes
        assert set(dtypes) <= set(DTYPE_BYTES), f"unknown dtype names in {dtypes}"

    def test_memory_info(self) -> None:
        p = self.make_platform()
        if not p.is_available():
            with pytest.raises(PlatformUnavailableError):
                p.memory_info(0)
            return
        free, total = p.memory_info(0)
        assert isinstance(free, int) and isinstance(total, int)
        assert 0 <= free <= total and total > 0

    def test_memory_info_of_a_missing_device_raises(self) -> None:
        p = self.make_platform()
        if not p.is_available():
            pytest.skip(f"{p.name} is not available on this machine")
        with pytest.raises(ValueError):
            p.memory_info(p.device_count())
        with pytest.raises(ValueError):
            p.memory_info(-1)
