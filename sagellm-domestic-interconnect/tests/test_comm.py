"""The vendor communication backends: errors here, the collectives over gloo on 2 processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fakes import extension
from rank_programs import exact_program, hang_program

from sagellm.core import registry
from sagellm.core.errors import PlatformUnavailableError
from sagellm.core.protocols import CommBackend
from sagellm.domestic_interconnect import (
    BkclCommBackend,
    CnclCommBackend,
    HcclCommBackend,
    VendorCommConfig,
)
from sagellm.domestic_interconnect.launch import RankError, run_ranks

BACKENDS = {
    "hccl": (HcclCommBackend, "torch_npu", "pip install torch_npu (Huawei Ascend CANN)"),
    "cncl": (CnclCommBackend, "torch_mlu", "pip install torch_mlu (Cambricon Neuware SDK)"),
    "bkcl": (BkclCommBackend, "torch_xmlir", "pip install torch_xmlir (Kunlunxin XPU SDK)"),
}


def _registered() -> str:
    names = [n for n in dist.Backend.backend_list if n != "undefined"]
    return ", ".join(n for n in names if dist.is_backend_available(n))


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_registered_under_sagellm_comm_backend(name: str) -> None:
    registry.reset_cache()
    assert registry.load_class("comm_backend", name) is BACKENDS[name][0]


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_missing_from_torch_distributed(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cls, ext, hint = BACKENDS[name]
    monkeypatch.setitem(sys.modules, ext, None)  # the extension is not installed
    assert not dist.is_backend_available(name)
    with pytest.raises(PlatformUnavailableError) as info:
        cls(rank=0, world_size=1, init_method=f"file://{tmp_path}/store")
    assert str(info.value) == (
        f"torch.distributed backend {name!r} is not available (registered here: "
        f"{_registered()}); {ext} is not installed; {hint}"
    )
    assert not dist.is_initialized()


def test_through_the_registry_the_error_is_the_same(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    registry.reset_cache()
    with pytest.raises(PlatformUnavailableError, match=r"pip install torch_npu \(Huawei"):
        registry.load(
            "comm_backend", "hccl", rank=0, world_size=1, init_method=f"file://{tmp_path}/s"
        )


def test_extension_that_does_not_register_the_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch_mlu", extension("torch_mlu"))
    with pytest.raises(PlatformUnavailableError) as info:
        CnclCommBackend(rank=0, world_size=1, init_method=f"file://{tmp_path}/store")
    assert str(info.value) == (
        f"torch.distributed backend 'cncl' is not available (registered here: "
        f"{_registered()}); torch_mlu imported but did not register it; "
        "pip install torch_mlu (Cambricon Neuware SDK)"
    )


def test_bad_rank_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        HcclCommBackend(rank=2, world_size=2, backend="gloo")


def test_config_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="no_such_option"):
        VendorCommConfig(no_such_option=1)  # type: ignore[call-arg]


def test_single_rank_over_gloo_in_this_process(tmp_path: Path) -> None:
    comm = HcclCommBackend(rank=0, world_size=1, init_method=f"file://{tmp_path}/s", backend="gloo")
    try:
        assert isinstance(comm, CommBackend)
        assert (comm.rank, comm.world_size, comm.torch_backend) == (0, 1, "gloo")
        t = torch.tensor([1.0, 2.0])
        comm.all_reduce(t, "product")
        assert torch.equal(t, torch.tensor([1.0, 2.0]))
        out = torch.empty(2)
        comm.all_gather(out, torch.tensor([3.0, 4.0]))
        assert torch.equal(out, torch.tensor([3.0, 4.0]))
        comm.barrier()
        with pytest.raises(ValueError) as info:
            comm.all_reduce(t, "avg")
        assert str(info.value) == "unknown reduce op 'avg': use one of sum, max, min, product"
    finally:
        comm.close()
    comm.close()
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="closed"):
        comm.barrier()


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_two_processes_over_gloo_exact(name: str) -> None:
    cls = BACKENDS[name][0]
    results = run_ranks(
        2,
        exact_program,
        2,
        backend_class=f"{cls.__module__}:{cls.__name__}",
        backend="gloo",
        options={"timeout_s": 60},
        timeout_s=120,
    )
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = a * 2
    expected = {
        "sum": a + b,
        "max": torch.maximum(a, b),
        "min": torch.minimum(a, b),
        "product": a * b,
    }
    for rank, r in enumerate(results):
        assert (r["rank"], r["world_size"]) == (rank, 2)
        assert r["repr"] == f"{cls.__name__}(backend='gloo', rank={rank}, world_size=2)"
        for op, want in expected.items():
            assert torch.equal(r[op], want), (rank, op)
        assert torch.equal(r["int_sum"], torch.tensor([[10, 12, 14], [16, 18, 20]]))
        assert torch.equal(r["strided"], torch.full((4,), 3.0))
        assert torch.equal(r["all_gather"], torch.tensor([0, 0, 0, 1, 10, 100], dtype=torch.int32))
        assert torch.equal(r["all_gather_2d"], torch.tensor([[0.5, -0.5], [1.5, -1.5]]))
        assert torch.equal(r["recv"], torch.full((5,), float(1 - rank + 7)))
        assert r["bad_op"] == "unknown reduce op 'mean': use one of sum, max, min, product"
        assert r["bad_gather"] == (
            "all_gather output must hold world_size x 3 = 6 elements of torch.float32 (shape "
            "(6,) or any shape of that size), got shape (7,) with 7 elements of torch.float32"
        )
        assert r["bad_gather_dtype"] == (
            "all_gather output must hold world_size x 3 = 6 elements of torch.float32 (shape "
            "(6,) or any shape of that size), got shape (6,) with 6 elements of torch.int64"
        )
        assert r["after_close"] == "this communication backend is closed: build a new one"


def test_a_failing_rank_is_reported_and_stopped() -> None:
    with pytest.raises(RankError, match="PlatformUnavailableError"):
        run_ranks(
            2,
            exact_program,
            2,
            backend_class="sagellm.domestic_interconnect.comm:HcclCommBackend",
            timeout_s=60,
        )  # no backend override: hccl is not in this torch, both ranks raise


def test_a_hanging_rank_times_out_and_every_rank_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError) as info:
        run_ranks(
            2,
            hang_program,
            str(tmp_path),
            backend_class="sagellm.domestic_interconnect.comm:HcclCommBackend",
            backend="gloo",
            timeout_s=20,
        )
    assert str(info.value) == "ranks [1] of 2 did not finish within 20 s"
    for rank in (0, 1):
        pid = int((tmp_path / f"rank{rank}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
