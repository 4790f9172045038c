"""core's Platform suite on every platform (absent here, and a stand-in Ascend), and its
CommBackend suite on the hccl backend class run over gloo in 2 processes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import torch
from fakes import FakeDeviceModule, extension

from sagellm.core.testing import CommBackendConformance, PlatformConformance
from sagellm.domestic_interconnect import (
    AscendPlatform,
    CambriconPlatform,
    HygonPlatform,
    KunlunPlatform,
    MetaxPlatform,
)
from sagellm.domestic_interconnect.launch import run_ranks


class TestAscendConformance(PlatformConformance):
    def make_platform(self) -> Any:
        return AscendPlatform()


class TestCambriconConformance(PlatformConformance):
    def make_platform(self) -> Any:
        return CambriconPlatform()


class TestHygonConformance(PlatformConformance):
    def make_platform(self) -> Any:
        return HygonPlatform()


class TestKunlunConformance(PlatformConformance):
    def make_platform(self) -> Any:
        return KunlunPlatform()


class TestMetaxConformance(PlatformConformance):
    def make_platform(self) -> Any:
        return MetaxPlatform()


class TestStandInAscendConformance(PlatformConformance):
    """The available path: torch_npu replaced by a stand-in with 2 devices."""

    @pytest.fixture(autouse=True)
    def _fake_torch_npu(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        npu = FakeDeviceModule("torch.npu", count=2)
        monkeypatch.setitem(sys.modules, "torch_npu", extension("torch_npu", npu=npu))
        monkeypatch.setattr(torch, "npu", npu, raising=False)
        yield

    def make_platform(self) -> Any:
        return AscendPlatform()


class TestHcclOverGlooConformance(CommBackendConformance):
    world_sizes: ClassVar[tuple[int, ...]] = (2,)

    def run_ranks(self, world_size: int, program: Callable[[Any, int], Any]) -> list[Any]:
        return run_ranks(
            world_size,
            program,
            world_size,
            backend_class="sagellm.domestic_interconnect.comm:HcclCommBackend",
            backend="gloo",
            options={"timeout_s": 120},
            timeout_s=240,
        )
