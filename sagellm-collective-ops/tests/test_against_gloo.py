"""The shared-memory all-reduce and all-gather against gloo's, world sizes 2 to 4.

Integers and max/min must equal gloo's exactly; float sums within rounding (gloo adds in
its own order); every rank must hold the same bits.
"""

from __future__ import annotations

import glob
import multiprocessing as mp

import pytest
import rank_programs
import torch

from sagellm.collective_ops import run_ranks

# 64 KiB slots: 70,000 float64 elements take nine rounds, exercising the chunking
OPTIONS = {"shm_slot_bytes": 65536, "timeout_s": 60}


@pytest.fixture(scope="module", params=[2, 3, 4])
def results(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    before = set(glob.glob("/dev/shm/sagellm_*"))
    out = run_ranks(request.param, rank_programs.against_gloo, options=OPTIONS, timeout_s=240)
    assert set(glob.glob("/dev/shm/sagellm_*")) == before  # nothing left in /dev/shm
    assert mp.active_children() == []
    return request.param, out


def _tolerance(dtype: torch.dtype) -> float:
    return {
        torch.float32: 1e-6,
        torch.float64: 1e-13,
        torch.bfloat16: 2e-2,
        torch.float16: 2e-3,
    }.get(dtype, 0.0)


def test_all_reduce_equals_gloo(results: tuple[int, list[dict]]) -> None:
    world, per_rank = results
    checked = 0
    for key, (got, ref) in per_rank[0].items():
        if key in ("stats", "transposed") or key.startswith("all_gather"):
            continue
        op = key.rsplit("/", 1)[1]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        tol = _tolerance(got.dtype)
        if tol == 0.0 or op != "sum":
            assert torch.equal(got, ref), f"world {world} {key}"
        else:
            err = ((got.double() - ref.double()).abs() / ref.double().abs().clamp_min(1)).max()
            assert float(err) <= tol * world, f"world {world} {key}: {float(err)}"
        checked += 1
    assert checked == 2 * len(rank_programs.DTYPES) * len(rank_programs.SIZES) * 3


def test_every_rank_holds_the_same_bits(results: tuple[int, list[dict]]) -> None:
    world, per_rank = results
    for key, (got, _) in per_rank[0].items():
        if key == "stats":
            continue
        for r in range(1, world):
            assert torch.equal(got, per_rank[r][key][0]), f"world {world} {key}: rank {r}"


def test_all_gather_equals_gloo(results: tuple[int, list[dict]]) -> None:
    world, per_rank = results
    for r in range(world):
        for key, value in per_rank[r].items():
            if key.startswith("all_gather"):
                got, ref = value
                assert torch.equal(got, ref), f"world {world} rank {r} {key}"


def test_non_contiguous_tensor_and_stats(results: tuple[int, list[dict]]) -> None:
    world, per_rank = results
    got, ref = per_rank[0]["transposed"]
    assert torch.allclose(got, ref, rtol=1e-6)
    stats = per_rank[0]["stats"]
    # the backend's own calls: one all_gather per (dtype, size) and the transposed all_reduce
    assert sum(v for k, v in stats.items() if k.startswith("all_gather/")) == len(
        rank_programs.DTYPES
    ) * len(rank_programs.SIZES)
    assert sum(v for k, v in stats.items() if k.startswith("all_reduce/")) == 1
