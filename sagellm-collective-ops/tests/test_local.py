"""Single-process checks: configuration errors, the cost model, bucket assignment."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sagellm.collective_ops import (
    CollectiveConfig,
    CostModel,
    TorchCommBackend,
    all_reduce_coalesced,
    assign_buckets,
    choose,
)
from sagellm.collective_ops.shm import segment_bytes, shm_supported


def test_cost_model_table_exact() -> None:
    m = CostModel(step_us=2.0, mem_gbps=10.0, torch_alpha_us=200.0, torch_beta_gbps=1.0)
    t = m.table("all_reduce", 10_000, 2, ["shm_flat", "shm_direct", "torch"])
    assert t == pytest.approx({"shm_flat": 2 + 5.0, "shm_direct": 4 + 4.5, "torch": 200 + 10.0})
    assert m.traffic("shm_direct", 1000, 4) == pytest.approx(4750)  # (5 - 1/4) n
    assert m.traffic("shm_flat", 1000, 4) == 7000
    # all_gather has no direct variant
    assert set(m.table("all_gather", 64, 2, ["shm_flat", "shm_direct", "torch"])) == {
        "shm_flat",
        "torch",
    }
    with pytest.raises(ValueError, match="no traffic model for 'ring'"):
        m.traffic("ring", 1, 2)


def test_choose_cheapest_and_all_disabled() -> None:
    assert choose({"a": 3.0, "b": 1.0, "c": 2.0}) == "b"
    assert choose({"a": 1.0, "b": 1.0}) == "a"
    with pytest.raises(ValueError, match="every algorithm is disabled"):
        choose({"a": math.inf})


@given(
    st.lists(st.tuples(st.integers(0, 5000), st.sampled_from(["f32", "i64", "bf16"])), max_size=40),
    st.integers(1, 8192),
)
def test_bucket_assignment_properties(items: list[tuple[int, str]], cap: int) -> None:
    sizes = [s for s, _ in items]
    kinds = [k for _, k in items]
    buckets = assign_buckets(sizes, kinds, cap)
    flat = [i for b in buckets for i in b]
    assert sorted(flat) == list(range(len(items)))  # every tensor once
    for b in buckets:
        assert b == sorted(b)  # order kept inside a bucket
        assert len({kinds[i] for i in b}) == 1  # one dtype per bucket
        assert len(b) == 1 or sum(sizes[i] for i in b) <= cap
    # greedy: a bucket closed only because the next tensor of its kind would not fit
    by_kind: dict[str, list[list[int]]] = {}
    for b in buckets:
        by_kind.setdefault(kinds[b[0]], []).append(b)
    for group in by_kind.values():
        for prev, nxt in zip(group, group[1:]):
            assert sum(sizes[i] for i in prev) + sizes[nxt[0]] > cap


def test_bucket_errors() -> None:
    with pytest.raises(ValueError, match="2 sizes but 1 kinds"):
        assign_buckets([1, 2], ["a"], 10)
    with pytest.raises(ValueError, match="cap_bytes must be positive, got 0"):
        assign_buckets([1], ["a"], 0)
    with pytest.raises(ValueError, match="size of tensor 0 is negative"):
        assign_buckets([-1], ["a"], 10)


class Doubler:
    """A fake two-rank world where both ranks hold the same tensors: sum doubles."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        self.calls.append(tensor.numel())
        tensor.mul_(2)


def test_coalesced_with_a_fake_backend() -> None:
    ts = [torch.arange(3.0), torch.arange(5, dtype=torch.int64), torch.arange(4.0).view(2, 2)]
    backend = Doubler()
    assert all_reduce_coalesced(backend, ts, cap_bytes=1024) == 2
    assert backend.calls == [7, 5]  # both float32 tensors in one flat buffer
    assert torch.equal(ts[0], torch.tensor([0.0, 2.0, 4.0]))
    assert torch.equal(ts[2], torch.tensor([[0.0, 2.0], [4.0, 6.0]]))
    assert torch.equal(ts[1], torch.arange(5, dtype=torch.int64) * 2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank 2 with world_size 2"):
        TorchCommBackend(rank=2, world_size=2)
    with pytest.raises(
        ValueError, match="unknown algorithm 'ring': use one of shm_flat, shm_direct, torch"
    ):
        TorchCommBackend(CollectiveConfig(algorithm="ring"), rank=0, world_size=1)
    with pytest.raises(ValueError):
        CollectiveConfig(shm_slot_bytes=100)


def test_single_rank_backend() -> None:
    with tempfile.TemporaryDirectory() as d:
        b = TorchCommBackend(rank=0, world_size=1, init_method=f"file://{d}/store")
        try:
            assert not b.has_shm  # nothing to share with
            x = torch.arange(4.0)
            b.all_reduce(x, "max")
            assert torch.equal(x, torch.arange(4.0))
            out = torch.empty(4)
            b.all_gather(out, x)
            assert torch.equal(out, x)
            with pytest.raises(
                ValueError, match="unknown reduce op 'mean': use one of sum, max, min, product"
            ):
                b.all_reduce(x, "mean")
            with pytest.raises(
                ValueError, match=r"must hold world_size x 4 = 4 elements of torch.float32, got 5"
            ):
                b.all_gather(torch.empty(5), x)
            b.barrier()
        finally:
            b.close()
        b.close()  # idempotent
        with pytest.raises(RuntimeError, match="this communication backend is closed"):
            b.all_reduce(torch.ones(1))


def test_segment_size() -> None:
    # header 4 KiB, 2 banks x 2 slots, 2 result areas
    assert segment_bytes(2, 1 << 20) == 4096 + 4 * (1 << 20) + 2 * (1 << 20)


def test_backend_name_comes_from_the_platform() -> None:
    from sagellm.collective_ops.backend import resolve_backend

    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert resolve_backend("hccl") == "hccl"  # a name a platform registers is passed on


def test_bench_sizes() -> None:
    from sagellm.collective_ops.bench import parse_size

    assert [parse_size(s) for s in ("16", "4K", "1M", "2g")] == [16, 4096, 1 << 20, 2 << 30]
    with pytest.raises(ValueError, match="not a size: '4KB'"):
        parse_size("4KB")


# ---------------------------------------------------------------------- a peer that exits


def _reaped_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_process_alive_sees_running_exited_and_zombie_processes() -> None:
    import os
    import subprocess
    import sys
    import time

    from sagellm.collective_ops.shm import process_alive

    assert process_alive(os.getpid())
    assert not process_alive(_reaped_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while process_alive(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # exited, not yet reaped: a zombie
    assert not process_alive(zombie.pid)
    zombie.wait()


@pytest.mark.skipif(not shm_supported(), reason="shared-memory collectives are x86-64 Linux")
def test_a_wait_for_a_rank_that_exited_fails_at_once() -> None:
    import os
    import time

    from sagellm.collective_ops.shm import ShmGroup

    segment = ShmGroup.create_segment(2, 4096)
    dead = _reaped_pid()
    group = ShmGroup(segment, 0, 2, 4096, timeout_s=60.0, peer_pids=[os.getpid(), dead])
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {dead}\) exited during a shared"):
            group.all_reduce(torch.ones(8), "sum", "shm_flat")
        assert time.monotonic() - t0 < 5.0  # not the 60 s timeout
    finally:
        group.close()
