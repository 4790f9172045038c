"""The perf gate's rules: exact counters, and the ratio-and-significance timing rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm.engine.bench import perf_gate as gate


def test_counter_mismatch_names_the_counter_and_both_values() -> None:
    stored = {"batch": {"engine.num_steps": 20, "kv_pool.peak_used_blocks": 15}}
    measured = {"batch": {"engine.num_steps": 23, "kv_pool.peak_used_blocks": 15}}
    failures, notes = gate.check_counters(stored, measured)
    assert failures == ["counter batch/engine.num_steps: baseline 20, measured 23"]
    assert notes == []


def test_missing_counters_fail_and_new_ones_are_notes() -> None:
    stored = {"batch": {"engine.num_steps": 20}, "prefix": {"scheduler.num_prefix_hit_tokens": 9}}
    measured = {"batch": {"engine.num_steps": 20, "engine.num_new": 1}, "other": {"x": 1}}
    failures, notes = gate.check_counters(stored, measured)
    assert failures == ["workload 'prefix': in the baseline but not measured"]
    assert notes == [
        "counter batch/engine.num_new = 1 is new (not in the baseline)",
        "workload 'other' is new (not in the baseline)",
    ]
    failures, _ = gate.check_counters({"batch": {"a": 1}}, {"batch": {}})
    assert failures == ["counter batch/a: baseline 1, not measured"]


def test_mann_whitney_exact_values() -> None:
    # fully separated samples of 4: the two extreme orderings of C(8, 4) = 70
    u, p = gate.mann_whitney_u([5, 6, 7, 8], [1, 2, 3, 4])
    assert u == 16 and p == pytest.approx(2 / 70)
    u, p = gate.mann_whitney_u([1, 2, 3, 4], [5, 6, 7, 8])
    assert u == 0 and p == pytest.approx(2 / 70)
    # interleaved samples: nothing to see
    _, p = gate.mann_whitney_u([1, 3, 5, 7], [2, 4, 6, 8])
    assert p > 0.5
    # one swap among 3 + 3: U = 1 -> P(U <= 1) + P(U >= 8) = 4/20
    _, p = gate.mann_whitney_u([1, 2, 4], [3, 5, 6])
    assert p == pytest.approx(4 / 20)
    # identical samples: every pair tied, p = 1
    assert gate.mann_whitney_u([1.0, 1.0], [1.0, 1.0])[1] == pytest.approx(1.0)
    # large samples use the normal approximation and agree in direction
    a = [float(i) for i in range(30)]
    b = [float(i) + 40 for i in range(30)]
    assert gate.mann_whitney_u(a, b)[1] < 1e-6
    assert gate.min_p_value(3, 3) == pytest.approx(0.1)


def test_is_different_falls_back_to_intervals_for_tiny_samples() -> None:
    # 2 + 2 samples cannot reach p < 0.05: [min, max] intervals decide
    assert gate.is_different([1.0, 1.1], [2.0, 2.1])
    assert not gate.is_different([1.0, 2.05], [2.0, 2.1])
    # 5 + 5: Mann-Whitney decides
    assert gate.is_different([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert not gate.is_different([1, 3, 5, 7, 9], [2, 4, 6, 8, 10])


def test_judge_needs_both_the_threshold_and_significance() -> None:
    base = [100.0, 101.0, 99.0, 100.5, 99.5]
    # 20% slower, well separated: a regression
    v = gate.judge("decode_b1", base, [80.0, 81.0, 79.0, 80.5, 79.5], threshold=1.10)
    assert v.regressed and v.significant and not v.improved
    assert v.ratio == pytest.approx(0.8)
    assert "REGRESSED" in v.line() and "decode_b1" in v.line()
    # 5% slower, significant but inside the threshold: passes
    v = gate.judge("decode_b1", base, [95.0, 96.0, 94.0, 95.5, 94.5], threshold=1.10)
    assert v.significant and not v.regressed
    # 20% slower median but the samples overlap (noise): not significant, passes
    v = gate.judge("prefill", base, [80.0, 120.0, 60.0, 100.0, 79.0], threshold=1.10)
    assert not v.significant and not v.regressed
    # faster beyond the threshold: an improvement, never a failure
    v = gate.judge("offline", base, [130.0, 131.0, 129.0, 130.5, 129.5], threshold=1.10)
    assert v.improved and not v.regressed
    # lower-is-better figures (latencies) turn the ratio round
    v = gate.judge("ttft", [1.0, 1.01, 0.99, 1.0], [2.0, 2.1, 1.9, 2.0], higher_is_better=False)
    assert v.regressed and v.ratio == pytest.approx(0.5)
    with pytest.raises(ValueError):
        gate.judge("x", base, base, threshold=0.9)


def test_baseline_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "perf" / "baseline.json"
    gate.write_baseline(path, {"b": {"z": 2, "a": 1}}, "abc123")
    data = gate.read_baseline(path)
    assert data["commit"] == "abc123" and data["counters"] == {"b": {"a": 1, "z": 2}}
    assert list(data["counters"]["b"]) == ["a", "z"]  # stable order: clean diffs
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format"):
        gate.read_baseline(path)


def test_stored_baseline_is_readable() -> None:
    data = gate.read_baseline(gate.default_baseline_path())
    assert len(data["commit"]) == 40
    names = {w.name for w in gate.COUNTER_WORKLOADS}
    assert set(data["counters"]) == names


def test_counters_are_deterministic_and_count_the_workload(tiny_model: Path) -> None:
    workloads = [w for w in gate.COUNTER_WORKLOADS if w.needs is None]
    first = gate.collect_counters(tiny_model, workloads)
    assert first == gate.collect_counters(tiny_model, workloads)
    batch = first["batch"]
    (wave,) = next(w for w in workloads if w.name == "batch").waves
    assert batch["engine.num_generation_tokens"] == sum(m for _, m in wave)
    assert batch["engine.num_prompt_tokens"] == sum(n for n, _ in wave)
    assert batch["engine.num_requests_finished"] == len(wave)
    assert batch["kv_pool.num_used_blocks"] == 0  # nothing leaked
    assert batch["kv_pool.peak_used_blocks"] > 0
    assert first["preempt"]["engine.num_preemptions"] > 0
    assert first["chunked"]["engine.num_steps"] > first["chunked"]["engine.num_requests_added"]


def test_prefix_workload_counts_hits(tiny_model: Path) -> None:
    pytest.importorskip("sagellm.prefix_cache")
    (prefix,) = [w for w in gate.COUNTER_WORKLOADS if w.name == "prefix"]
    got = gate.collect_counters(tiny_model, [prefix])["prefix"]
    # five requests share the first one's 48-token prefix: three full 16-token blocks each
    assert got["scheduler.num_prefix_hit_tokens"] == 5 * 48


def test_missing_research_package_is_a_clear_error(tiny_model: Path) -> None:
    w = gate.CounterWorkload("x", {}, (((4, 1),),), needs="sagellm.no_such_package")
    with pytest.raises(RuntimeError, match="sagellm.no_such_package"):
        gate.collect_counters(tiny_model, [w])


def test_gate_fails_on_a_changed_counter(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workloads = tuple(w for w in gate.COUNTER_WORKLOADS if w.needs is None)
    monkeypatch.setattr(gate, "COUNTER_WORKLOADS", workloads)
    monkeypatch.setattr(gate, "_tiny_model", lambda folder: tiny_model)
    original = gate.collect_counters

    def only_local(model: Path, ws: object = workloads, **kw: object) -> dict:
        return original(model, workloads, **kw)

    monkeypatch.setattr(gate, "collect_counters", only_local)
    path = tmp_path / "baseline.json"
    measured = only_local(tiny_model)
    gate.write_baseline(path, measured, "0" * 40)
    assert gate.main(["--baseline", str(path), "--counters-only"]) == 0
    measured["batch"]["engine.num_steps"] += 1
    gate.write_baseline(path, measured, "0" * 40)
    assert gate.main(["--baseline", str(path), "--counters-only"]) == 1
