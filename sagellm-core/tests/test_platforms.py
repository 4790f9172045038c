"""Built-in platforms, plugin platforms and host memory reading."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FakeDist

from sagellm.core import platforms
from sagellm.core.errors import PlatformUnavailableError
from sagellm.core.platforms import (
    CpuPlatform,
    CudaPlatform,
    RocmPlatform,
    current_platform,
    get_platform,
    list_platforms,
)
from sagellm.core.protocols import Platform


def test_builtin_attributes() -> None:
    rows = [
        (p.name, p.device_type, p.dist_backend, p.visible_devices_env)
        for p in (CpuPlatform(), CudaPlatform(), RocmPlatform())
    ]
    assert rows == [
        ("cpu", "cpu", "gloo", "CPU_VISIBLE_MEMORY_NODES"),
        ("cuda", "cuda", "nccl", "CUDA_VISIBLE_DEVICES"),
        ("rocm", "cuda", "nccl", "HIP_VISIBLE_DEVICES"),
    ]


def test_cpu_memory_matches_proc_meminfo() -> None:
    meminfo = dict(
        (line.split(":")[0], int(line.split()[1]) * 1024)
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.split()[-1] == "kB"
    )
    free, total = CpuPlatform().memory_info()
    assert total <= meminfo["MemTotal"]
    assert 0 < free <= total
    # MemAvailable moves a little between the two reads
    assert abs(free - min(meminfo["MemAvailable"], total)) < 512 * 1024 * 1024


def test_meminfo_parser(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text(
        "MemTotal:  1000 kB\nMemFree:  200 kB\nMemAvailable:  600 kB\nHugePages_Total: 0\n"
    )
    assert platforms._meminfo(f) == (600 * 1024, 1000 * 1024)
    f.write_text("MemTotal:  1000 kB\nMemFree:  200 kB\n")
    assert platforms._meminfo(f) == (200 * 1024, 1000 * 1024)
    assert platforms._meminfo(tmp_path / "missing") is None


def test_cgroup_limits(tmp_path: Path) -> None:
    assert platforms._cgroup_limit(tmp_path) is None
    (tmp_path / "memory.max").write_text("max\n")
    assert platforms._cgroup_limit(tmp_path) is None
    (tmp_path / "memory.max").write_text("4096\n")
    (tmp_path / "memory.current").write_text("1024\n")
    assert platforms._cgroup_limit(tmp_path) == (4096, 1024)
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert platforms._cgroup_limit(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("8192\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("100\n")
    assert platforms._cgroup_limit(v1) == (8192, 100)


def test_host_memory_respects_a_cgroup_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platforms, "_meminfo", lambda: (6000, 10000))
    monkeypatch.setattr(platforms, "_cgroup_limit", lambda: (4000, 3000))
    assert platforms.host_memory_info() == (1000, 4000)
    monkeypatch.setattr(platforms, "_cgroup_limit", lambda: None)
    assert platforms.host_memory_info() == (6000, 10000)


def test_cpu_memory_info_index() -> None:
    with pytest.raises(ValueError) as info:
        CpuPlatform().memory_info(1)
    assert str(info.value) == (
        "cpu: device_index 1 is out of range; this process sees 1 device(s) (0..0); "
        "check CPU_VISIBLE_MEMORY_NODES"
    )


def test_cuda_is_unavailable_here() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cuda = get_platform("cuda")
    assert (cuda.is_available(), cuda.device_count()) == (False, 0)
    with pytest.raises(PlatformUnavailableError, match="sees no CUDA device"):
        cuda.memory_info(0)


def test_get_platform_builtin_and_cached() -> None:
    assert isinstance(get_platform("cpu"), CpuPlatform)
    assert get_platform("CPU") is get_platform("cpu")
    assert isinstance(get_platform("rocm"), RocmPlatform)


def _has_gpu() -> bool:
    return get_platform("cuda").is_available() or get_platform("rocm").is_available()


def test_current_platform_is_cpu_without_a_gpu() -> None:
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    assert current_platform().name == "cpu"


@pytest.mark.parametrize("name", ["ascend", "cambricon", "hygon", "kunlun"])
def test_domestic_platform_names_the_package(name: str, fake_dist: FakeDist) -> None:
    fake_dist("empty", "0.0.1", {})
    with pytest.raises(PlatformUnavailableError) as info:
        get_platform(name)
    assert str(info.value) == (
        f"platform {name!r} is not installed; it is provided by sagellm-domestic-interconnect: "
        "pip install 'sagellm[comm]' (installed platforms: cpu, cuda, rocm)"
    )


def test_unknown_platform(fake_dist: FakeDist) -> None:
    fake_dist("empty", "0.0.1", {})
    with pytest.raises(PlatformUnavailableError) as info:
        get_platform("tpu")
    assert str(info.value) == (
        "unknown platform 'tpu'; installed platforms: cpu, cuda, rocm; ascend, cambricon, "
        "hygon, kunlun, metax come from sagellm-domestic-interconnect (pip install 'sagellm[comm]')"
    )


PLUGIN = """
class FakeNpu:
    name = "fakenpu"
    device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    def is_available(self):
        return True

    def device_count(self):
        return 2

    def memory_info(self, device_index=0):
        return (1, 2)

    def supported_dtypes(self):
        return ("float16", "bfloat16")


class NotAPlatform:
    pass
"""


def test_plugin_platforms(fake_dist: FakeDist) -> None:
    fake_dist(
        "fake-npu",
        "0.3.0",
        {"sagellm.platform": {"fakenpu": "fakenpu_mod:FakeNpu", "odd": "fakenpu_mod:NotAPlatform"}},
        {"fakenpu_mod": PLUGIN},
    )
    assert list_platforms() == ["cpu", "cuda", "rocm", "fakenpu", "odd"]
    p = get_platform("fakenpu")
    assert isinstance(p, Platform)
    assert (p.device_type, p.dist_backend, p.device_count()) == ("npu", "hccl", 2)
    with pytest.raises(PlatformUnavailableError) as info:
        get_platform("odd")
    assert str(info.value) == (
        "the sagellm.platform entry point 'odd' gave NotAPlatform, which does not implement "
        "sagellm.core.protocols.Platform"
    )
    if not _has_gpu():
        assert current_platform() is p


def test_plugin_excluded_by_allow_list(
    fake_dist: FakeDist, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dist(
        "fake-npu",
        "0.3.0",
        {"sagellm.platform": {"fakenpu": "fakenpu_mod:FakeNpu"}},
        {"fakenpu_mod": PLUGIN},
    )
    monkeypatch.setenv("SAGELLM_PLUGINS", "radix")
    assert list_platforms() == ["cpu", "cuda", "rocm"]
    with pytest.raises(PlatformUnavailableError, match="excluded by SAGELLM_PLUGINS"):
        get_platform("fakenpu")
