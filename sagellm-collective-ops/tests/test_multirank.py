"""Bucket fusion, the cost-table choice and failure handling across real ranks."""

from __future__ import annotations

import glob
import multiprocessing as mp

import pytest
import rank_programs
import torch

from sagellm.collective_ops import RankError, run_ranks


@pytest.fixture(scope="module")
def misc() -> list[dict]:
    return run_ranks(2, rank_programs.misc, 4096, timeout_s=240)


def test_fused_equals_one_all_reduce_per_tensor(misc: list[dict]) -> None:
    for r in range(2):
        c = misc[r]["coalesced"]
        for single, fused, streamed in zip(c["singles"], c["fused"], c["streamed"]):
            assert single.dtype == fused.dtype and single.shape == fused.shape
            assert torch.equal(single, fused)
            assert torch.equal(single, streamed)


def test_fusion_issues_one_collective_per_bucket(misc: list[dict]) -> None:
    c = misc[0]["coalesced"]
    # 4 KiB cap: float32 [3, 100, 1000 (4000 B, closes the first bucket), 50x20 (alone)],
    # int64 [63 + 1 elements], bfloat16 [2]
    assert c["num_buckets"] == 5 == c["calls"]
    assert c["bucketer_total"] == 5
    assert sum(c["issued"]) == 5
    assert c["issued"][-1] > 0  # flush reduced what was still open


def test_cost_table_choice_and_tuner(misc: list[dict]) -> None:
    t = misc[0]["tuned"]
    # priors: flat 2 + 5n/1e4 us, direct 4 + 4.5n/1e4 us at two ranks: direct from 40 KB
    assert t["choices"] == {
        16: "shm_flat",
        4096: "shm_flat",
        40_000: "shm_flat",
        1 << 20: "shm_direct",
    }
    assert t["gather"] == "shm_flat"
    assert t["after_tuner"] == {"all_reduce/torch": 1}  # the tuner disabled shared memory
    assert torch.equal(t["x"], torch.full((100,), 2.0))
    assert misc[1]["tuned"]["choices"] == t["choices"]  # every rank chooses alike


def _segments() -> set[str]:
    return set(glob.glob("/dev/shm/sagellm_*"))


def test_a_rank_that_skips_a_collective_times_out_cleanly() -> None:
    before = _segments()
    with pytest.raises(RankError, match=r"rank 0 failed:(.|\n)*waited 2 s for rank 1"):
        run_ranks(2, rank_programs.skip_one, options={"timeout_s": 2}, timeout_s=120)
    assert _segments() == before
    assert mp.active_children() == []


def test_a_rank_that_exits_fails_the_collective_at_once() -> None:
    """Not after the 60 s timeout: a shared-memory wait checks that its peer still runs."""
    import re

    from sagellm.core.testing.ranks import run_programs

    before = _segments()
    programs = [(rank_programs.exit_one, ()), (rank_programs.exit_one, ())]
    first, second = run_programs(programs, timeout_s=120, stop_on_error=False)
    assert (second.status, second.value) == ("exit", 3)
    assert first.status == "ok"
    m = re.fullmatch(
        r"rank 1 \(pid \d+\) exited during a shared-memory all_reduce on rank 0 after "
        r"([0-9.]+) s",
        first.value,
    )
    assert m is not None, first.value
    assert float(m.group(1)) < 5.0
    assert _segments() == before
    assert mp.active_children() == []


def test_a_hanging_rank_is_stopped() -> None:
    before = _segments()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 4 s"):
        run_ranks(2, rank_programs.sleep_forever, timeout_s=4)
    assert _segments() == before
    assert mp.active_children() == []
