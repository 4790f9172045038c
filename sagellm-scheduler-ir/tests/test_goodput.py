from __future__ import annotations

import pytest

from sagellm.scheduler_ir.goodput import (
    POLICY_OPTIONS,
    compare,
    format_table,
    main,
    make_workload,
    measure_build,
    replay,
)


def test_workload_is_seeded_and_mixed():
    a = make_workload(20, seed=3)
    b = make_workload(20, seed=3)
    assert [r.request for r in a] == [r.request for r in b]
    kinds = {r.request.request_id.split("-")[0] for r in a}
    assert kinds == {"long", "chat"}
    assert all(x.request.arrival_time < y.request.arrival_time for x, y in zip(a, a[1:]))


def test_every_policy_finishes_the_workload_and_fcfs_ratio_is_one():
    wl = make_workload(30, seed=1, rate=1.0)
    res = compare(wl)
    assert set(res) == set(POLICY_OPTIONS)
    for r in res.values():
        assert r.num_requests == 30 and r.num_rejected == 0
        assert 0 <= r.num_good <= 30 and r.makespan_s > 0
    table = format_table(res)
    assert "| fcfs | " in table and "| 1.00x |" in table


def test_step_cost_model_drives_time():
    # one chat request alone: TTFT is exactly a + b * prompt tokens (one step)
    wl = make_workload(1, seed=0, long_fraction=0.0, chat_prompt=(100, 100), chat_output=(3, 3))
    r = replay("fcfs", wl, a=0.01, b=0.001, options={"max_num_batched_tokens": 512})
    assert r.mean_ttft_s == pytest.approx(0.01 + 0.1)
    assert r.makespan_s == pytest.approx(0.11 + 2 * 0.011)
    assert r.num_good == 1


def test_rejections_are_counted():
    wl = make_workload(20, seed=2, rate=50.0)
    r = replay("fcfs", wl, options={"max_waiting": 2, "admission": "reject", "max_num_seqs": 2})
    assert r.num_rejected > 0 and r.num_good <= 20 - r.num_rejected


def test_main_prints_the_table(capsys):
    main(["--requests", "10", "--seed", "4", "--build", "0"])
    out = capsys.readouterr().out
    assert out.count("\n") == 8 and "| pd |" in out


def test_measure_build_covers_every_policy():
    res = measure_build(8, repeats=2)
    assert set(res) == set(POLICY_OPTIONS)
    assert all(v > 0 for f in res.values() for v in f.values())
