"""The rank launcher: results in rank order, errors with the rank's traceback, timeouts,
and no process or temporary folder left behind. Plain-Python programs: torch is not
needed (the process-group test skips without it)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import launch_programs as progs
import pytest

from sagellm.core.testing import ranks
from sagellm.core.testing.ranks import RankError, RankOutcome, run_programs, run_ranks

ranks.preload(["launch_programs"])


def _alive(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    if not psutil.pid_exists(pid):
        return False
    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def _folder(init_method: str) -> Path:
    return Path(init_method.removeprefix("file://")).parent


def test_results_come_back_in_rank_order() -> None:
    out = run_ranks(progs.describe, 3, args=(10,), timeout_s=60)
    assert [r["value"] for r in out] == [0, 10, 20]
    assert [(r["rank"], r["world_size"]) for r in out] == [(0, 3), (1, 3), (2, 3)]
    assert {(r["backend"], r["device"]) for r in out} == {(None, "cpu")}
    assert len({r["init_method"] for r in out}) == 1  # one rendezvous for the launch
    assert len({r["pid"] for r in out}) == 3 and os.getpid() not in {r["pid"] for r in out}
    folder = _folder(out[0]["init_method"])
    assert folder.name.startswith("sagellm-ranks-") and not folder.exists()
    assert not any(_alive(r["pid"]) for r in out)
    assert mp.active_children() == []


def test_a_rank_that_raises_is_reported_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(progs.fail_on_rank_1, 2, timeout_s=60)
    # rank 0 (asleep) is stopped a grace second after rank 1 failed, not at the timeout
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert message.startswith("rank 1 failed:\nTraceback (most recent call last):\n")
    assert 'launch_programs.py", line ' in message and ", in fail_on_rank_1\n" in message
    assert message.rstrip().endswith("ValueError: rank 1 says no")
    assert "rank 0" not in message
    assert mp.active_children() == []


def test_a_hanging_rank_times_out_and_no_rank_is_left(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run_ranks(progs.hang_on_rank_1, 2, args=(str(tmp_path),), timeout_s=2)
    elapsed = time.monotonic() - start
    assert str(info.value) == "ranks [1] of 2 did not finish within 2 s"
    assert 2 <= elapsed < 20
    for rank in (0, 1):
        assert not _alive(int((tmp_path / f"rank{rank}").read_text()))
    assert mp.active_children() == []


def test_a_rank_that_dies_is_reported_with_its_exit_code() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(progs.die_on_rank_1, 2, timeout_s=60)
    assert str(info.value) == "rank 1 exited with code 17 before returning"
    assert mp.active_children() == []


def test_without_stop_on_error_the_other_ranks_run_on() -> None:
    outcomes = run_programs([(progs.die_on_rank_1, ())] * 2, timeout_s=60, stop_on_error=False)
    assert outcomes == [RankOutcome("ok", "survived"), RankOutcome("exit", 17)]


def test_programs_per_rank_and_their_outcomes(tmp_path: Path) -> None:
    outcomes = run_programs(
        [(progs.describe, (5,)), (progs.hang_on_rank_1, (str(tmp_path),))],
        timeout_s=2,
        stop_on_error=False,
    )
    assert outcomes[0].status == "ok" and outcomes[0].value["value"] == 0
    assert outcomes[1] == RankOutcome("timeout", 2)
    outcomes = run_programs([(progs.fail_on_rank_1, ())] * 2, timeout_s=60)
    assert outcomes[0] == RankOutcome("stopped", None)
    assert outcomes[1].status == "error" and "ValueError: rank 1 says no" in outcomes[1].value


def test_an_unpicklable_result_is_the_rank_s_error() -> None:
    with pytest.raises(RankError, match=r"^rank 0 failed:\nTraceback(.|\n)*pickle"):
        run_ranks(progs.unpicklable, 1, timeout_s=60)


def test_ranks_hand_each_other_objects() -> None:
    out = run_ranks(progs.ping_pong, 2, timeout_s=60)
    assert out == [("pong", "rank 0 received nothing within 0.2 s"), ("ping", None)]


def test_ranks_see_the_parent_environment_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_RANKS_PARENT", "parent")
    out = run_ranks(progs.environment, 2, env={"SAGELLM_RANKS_ENV": "extra"}, timeout_s=60)
    assert out == [("extra", "parent")] * 2


def test_comm_ranks_build_and_close_a_backend_each(tmp_path: Path) -> None:
    out = ranks.run_comm_ranks(
        "launch_programs:FakeComm",
        progs.describe_comm,
        2,
        args=(7,),
        options={"folder": str(tmp_path), "tag": "t"},
        context={"backend": "gloo"},
        timeout_s=60,
    )
    assert out == [
        {"rank": r, "world_size": 2, "tag": "t", "backend": "gloo", "file_store": True, "extra": 7}
        for r in range(2)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed0", "closed1"]
    with pytest.raises(RankError, match=r"^rank 0 failed:(.|\n)*no_such_option") as info:
        ranks.run_comm_ranks(
            progs.FakeComm,
            progs.describe_comm,
            2,
            args=(7,),
            options={"folder": str(tmp_path), "no_such_option": 1},
            timeout_s=60,
        )
    assert "\nrank 1 failed:\n" in str(info.value)  # both ranks raised: both reported


def test_arguments_are_checked_before_any_rank_starts() -> None:
    with pytest.raises(ValueError, match=r"^world_size must be >= 1, got 0$"):
        run_ranks(progs.describe, 0, args=(1,))
    with pytest.raises(ValueError, match=r"^timeout_s must be > 0, got 0$"):
        run_ranks(progs.describe, 1, args=(1,), timeout_s=0)
    with pytest.raises(ValueError, match=r"^device must be one of cpu, cuda, got 'npu'$"):
        run_ranks(progs.describe, 1, args=(1,), device="npu")
    with pytest.raises(ValueError, match=r"^programs must hold one \(fn, args\) per rank"):
        run_programs([])
    assert mp.active_children() == []


def test_a_gloo_group_is_set_up_for_the_program() -> None:
    pytest.importorskip("torch")
    assert run_ranks(progs.all_reduce, 2, backend="gloo", timeout_s=120) == [("gloo", 3.0)] * 2
