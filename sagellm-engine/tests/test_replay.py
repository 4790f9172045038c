"""The replay clock, its step-cost predictor, the trace generators and the CI/test helpers."""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sagellm.core.errors import SageLLMError
from sagellm.core.types import SLO, ScheduledChunk
from sagellm.engine.bench import kv_workloads
from sagellm.engine.bench.kv_workloads import GoodputRun, Req, goodput_table, run_requests
from sagellm.engine.bench.replay import calibrate_engine
from sagellm.engine.bench.stats import median_ci, sign_test, wilcoxon_signed_rank
from sagellm.engine.bench.traces import bursty_trace, diurnal_trace, mixed_trace
from sagellm.engine.replay import RealClock, ReplayClock, StepCostPredictor, StepShape

from .conftest import make_llm

#: A predictor with round coefficients: 2 ms a step, 0.1 ms a prefill token, 0.5 ms a
#: decode row, 0.01 ms per thousand attention pairs.
PRED = StepCostPredictor((2e-3, 1e-4, 5e-4, 1e-5))


def _chunk(n: int, computed: int, prefill: bool) -> ScheduledChunk:
    return ScheduledChunk("r", tuple(range(n)), computed, (), True, prefill)


def test_step_shape_of_scheduler_output() -> None:
    out = SimpleNamespace(chunks=(_chunk(8, 4, True), _chunk(1, 20, False), _chunk(3, 30, False)))
    shape = StepShape.of(out)
    # pairs: 8*4 + 36, 1*20 + 1, 3*30 + 6
    assert shape == StepShape(8, 2, 4, 68 + 21 + 96)
    # 2 draft tokens count as prefill-like; no dense threshold: no regime features
    assert shape.features() == (1.0, 10.0, 2.0, 0.185, 0.0, 0.0)
    # 12 tokens in the step: on the float product from 6 rows, on the blocks below 16
    assert shape.features(6) == (1.0, 10.0, 2.0, 0.185, 1.0, 0.0)
    assert shape.features(16) == (1.0, 10.0, 2.0, 0.185, 0.0, 2.0)


def test_fit_follows_the_two_regimes_of_a_dense_threshold() -> None:
    """Steps below the threshold cost per block row, steps from it a fixed float product:
    the fit recovers both, where one line in the rows cannot."""
    samples = []
    for rows in range(1, 33):
        cost = 0.010 + (0.004 * rows if rows < 6 else 0.012) + 0.001 * rows
        samples.append((StepShape(0, rows, rows, rows * 33), cost))
    fit = StepCostPredictor.fit(samples, dense_rows=6)
    assert fit.dense_rows == 6 and fit.residual < 0.02
    assert fit.predict(StepShape(0, 5, 5, 5 * 33)) == pytest.approx(0.035, rel=0.05)
    assert fit.predict(StepShape(0, 6, 6, 6 * 33)) == pytest.approx(0.028, rel=0.05)
    legacy = StepCostPredictor.fit(samples)  # no threshold: one line, a poor fit here
    assert legacy.residual > fit.residual


def test_fit_recovers_known_coefficients() -> None:
    rng = random.Random(0)
    samples = []
    for _ in range(40):
        shape = StepShape(rng.randrange(0, 300), (r := rng.randrange(0, 32)), r,
                          rng.randrange(0, 200_000))  # fmt: skip
        samples.append((shape, sum(c * f for c, f in zip(PRED.coefficients, shape.features()))))
    fit = StepCostPredictor.fit(samples, model="m", num_threads=2, cpu="c")
    for got, want in zip(fit.coefficients, PRED.coefficients):
        assert got == pytest.approx(want, rel=1e-9)
    assert fit.residual == pytest.approx(0.0, abs=1e-9)
    assert (fit.model, fit.num_threads, fit.cpu) == ("m", 2, "c")


def test_fit_keeps_coefficients_non_negative() -> None:
    # timings that fall with attention: the attention term is dropped, the rest refitted
    samples = [
        (StepShape(p, 0, 0, a), 1e-3 + 1e-4 * p - 1e-6 * a)
        for p, a in ((10, 0), (100, 50), (200, 100), (50, 300), (150, 10), (250, 200))
    ]
    fit = StepCostPredictor.fit(samples)
    assert fit.coefficients[3] == 0.0
    assert all(c >= 0.0 for c in fit.coefficients)
    with pytest.raises(ValueError, match="at least"):
        StepCostPredictor.fit(samples[:3])


def test_predictor_save_load_and_helpful_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    StepCostPredictor(PRED.coefficients, model="m", num_threads=2, cpu="x").save(path)
    back = StepCostPredictor.load(path)
    assert back.coefficients == PRED.coefficients and back.cpu == "x"
    with pytest.raises(SageLLMError, match="replay calibrate"):
        StepCostPredictor.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SageLLMError, match="not a step-cost calibration"):
        StepCostPredictor.load(tmp_path / "bad.json")
    # 256-token chunks: 2 + 25.6 + 0.32896 ms, then 2 + 25.6 + 0.01 * (65.536 + 32.896) ms
    assert PRED.prefill_seconds(512, 256) == pytest.approx(
        (2 + 25.6 + 0.32896 + 2 + 25.6 + 0.98432) / 1000, rel=1e-12
    )
    assert PRED.decode_seconds(4, 99) == pytest.approx((2 + 2 + 0.004) / 1000, rel=1e-12)


def test_replay_clock_advances_by_prediction() -> None:
    clock = ReplayClock(PRED, start=10.0)
    mark = clock.start_step()
    clock.advance(SimpleNamespace(chunks=(_chunk(1, 9, False),)))
    want = 2e-3 + 5e-4 + 1e-5 * 0.01
    assert clock.now() == 10.0 + want and clock.step_seconds(mark) == want
    clock.advance(SimpleNamespace(chunks=()))  # a step that computes nothing costs nothing
    assert clock.now() == 10.0 + want
    clock.jump_to(12.0)
    clock.jump_to(11.0)  # never backwards
    assert clock.now() == 12.0
    assert ReplayClock.virtual and not RealClock.virtual


def _workload(seed: int) -> list[Req]:
    rng = random.Random(seed)
    slo = SLO(ttft_ms=40.0, tpot_ms=6.0)
    reqs, t = [], 0.0
    for i in range(10):
        t += rng.expovariate(200.0)
        n = 60 if i % 3 == 0 else 8
        reqs.append(Req([rng.randrange(5, 300) for _ in range(n)], 6, arrival=t, slo=slo))
    return reqs


def _replayed(
    tiny_model: Path, scheduler: str, reqs: list[Req], slow: bool = False, start: float = 0.0
) -> Any:
    llm = make_llm(tiny_model, scheduler=scheduler, max_num_batched_tokens=32, num_blocks=256)
    engine = llm.engine
    engine.set_clock(ReplayClock(PRED, start=start))
    if slow:  # wall time passes in this run only
        real = engine.runtime.execute

        def execute(plan: Any, **kw: Any) -> Any:
            time.sleep(0.003)
            return real(plan, **kw)

        engine.runtime.execute = execute
    return run_requests(engine, reqs, "r")


@pytest.mark.parametrize("scheduler", ["fcfs", "slo"])
def test_replay_is_exactly_repeatable_under_load(tiny_model: Path, scheduler: str) -> None:
    reqs = _workload(3)
    a = _replayed(tiny_model, scheduler, reqs)
    b = _replayed(tiny_model, scheduler, reqs, slow=True)
    assert a.ttft == b.ttft and a.tpot == b.tpot and a.wall_seconds == b.wall_seconds
    assert a.tokens == b.tokens
    assert all(t > 0 for t in a.ttft) and min(a.tpot) > 0


def test_replay_single_request_times_are_the_predictions(tiny_model: Path) -> None:
    reqs = [Req(list(range(10, 50)), 3, arrival=0.3)]  # 40 tokens: chunks of 32 and 8
    # a start whose sum with the arrival rounds: the idle jump must still admit it
    res = _replayed(tiny_model, "fcfs", reqs, start=1000.1)
    first = PRED.predict(StepShape(32, 0, 0, 32 * 33 // 2))
    second = PRED.predict(StepShape(8, 0, 0, 8 * 32 + 36))
    decode = [PRED.predict(StepShape(0, 1, 1, 41 + k)) for k in range(2)]
    assert res.ttft == [pytest.approx(first + second, rel=1e-12)]
    assert res.tpot == [pytest.approx(sum(decode) / 2, rel=1e-12)]
    # the idle engine jumped to the arrival instead of sleeping
    assert res.wall_seconds == pytest.approx(0.3 + first + second + sum(decode), rel=1e-12)


def test_default_clock_is_the_real_one(tiny_llm: Any) -> None:
    assert type(tiny_llm.engine.clock) is RealClock
    before = time.monotonic()
    res = run_requests(tiny_llm.engine, [Req([5, 6, 7, 8], 2)], "real")
    assert 0 < res.ttft[0] < time.monotonic() - before + 1e-6


def test_calibration_fits_real_steps(tiny_model: Path) -> None:
    engine = make_llm(tiny_model, max_num_batched_tokens=64, num_blocks=512).engine
    lines: list[str] = []
    pred = calibrate_engine(
        engine, repeats=1, prefill_grid=(16, 96), decode_grid=((1, 16), (4, 16), (8, 32)),
        progress=lines.append, model="tiny",
    )  # fmt: skip
    assert len(lines) == 6 and lines[0] == "calibrating: prefill 16 tokens"
    assert lines[-1] == "calibrating: mixed burst 1/1"
    assert pred.model == "tiny" and min(pred.coefficients) >= 0
    assert pred.predict(StepShape(16, 0, 0, 136)) > 0
    assert type(engine.clock) is RealClock  # handed back


def test_fcfs_against_itself_is_exactly_equal_in_replay(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_workloads, "ENGINE_OPTIONS", {"dtype": "float32", "block_size": 4})
    monkeypatch.setattr(kv_workloads, "_warm", lambda engine, n: None)  # vocab of 320
    reqs = _workload(5)
    runs = kv_workloads.run_goodput(str(tiny_model), 1, ["fcfs", "fcfs"], [(1, reqs)], PRED)
    a, b = runs
    assert a.result.ttft == b.result.ttft and a.result.tpot == b.result.tpot
    assert a.num_met == b.num_met and a.goodput == b.goodput


@pytest.mark.parametrize("scheduler", ["fcfs", "slo", "adaptive", "priority"])
def test_schedule_only_replay_gives_the_native_runtime_s_schedule(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, scheduler: str
) -> None:
    """Without the forward pass, every request's TTFT, TPOT and the makespan are exactly
    those of the replay through the model (fixed output lengths, chunked prefill)."""
    monkeypatch.setattr(kv_workloads, "ENGINE_OPTIONS", {"dtype": "float32", "block_size": 4})
    monkeypatch.setattr(kv_workloads, "_warm", lambda engine, n: None)  # vocab of 320
    reqs = _workload(7)
    model, dry = (
        kv_workloads.run_goodput(
            str(tiny_model), 1, [scheduler], [(1, reqs)], PRED, schedule_only=only
        )[0]
        for only in (False, True)
    )
    assert model.result.ttft == dry.result.ttft and model.result.tpot == dry.result.tpot
    assert model.result.wall_seconds == dry.result.wall_seconds
    assert model.num_met == dry.num_met
    assert all(len(t) == r.max_tokens for t, r in zip(dry.result.tokens, reqs))


def test_schedule_replay_runtime_runs_only_on_a_replay_clock(tiny_model: Path) -> None:
    from sagellm.core.errors import CapabilityMismatchError
    from sagellm.core.protocols import Runtime
    from sagellm.engine.runtime.schedule_replay import ScheduleReplayRuntime

    llm = make_llm(tiny_model, runtime={"name": "schedule_replay"}, num_blocks=64)
    runtime = llm.engine.runtime
    assert isinstance(runtime, ScheduleReplayRuntime) and isinstance(runtime, Runtime)
    native = make_llm(tiny_model, num_blocks=64).engine.runtime
    assert runtime.kv_cache_schema(4) == native.kv_cache_schema(4)
    with pytest.raises(SageLLMError, match="before use_clock"):
        llm.engine.add_request("a", [5, 6, 7], kv_workloads.SamplingParams(max_tokens=2))
        llm.engine.step()
    with pytest.raises(CapabilityMismatchError, match="runs only on a replay clock"):
        runtime.use_clock(RealClock())
    with pytest.raises(ValueError, match="schedule_only needs clock='replay'"):
        kv_workloads.bench_goodput(str(tiny_model), clock="real", schedule_only=True)


def _run(policy: str, seed: int, met: int, wall: float) -> GoodputRun:
    res = kv_workloads.RunResult(policy, [], [0.1] * 4, [0.01] * 4, wall, {})
    return GoodputRun(policy, seed, res, met)


def test_goodput_table_ratios_and_tests() -> None:
    runs = [_run("fcfs", s, 2, 1.0) for s in range(1, 6)]
    runs += [_run("fcfs (again)", s, 2, 1.0) for s in range(1, 6)]
    runs += [_run("slo", s, 3 + (s == 5), 1.0) for s in range(1, 6)]
    lines = goodput_table(runs).splitlines()
    slo = lines[3].split()
    again = lines[2].split()
    assert slo[:12] == ["slo", "5", "3.00", "[3.00,", "4.00]", "0.75", "[0.75,", "1.00]",
                        "1.50x", "5/0/0", "0.062", "0.062"]  # fmt: skip
    assert again[9:13] == ["1.00x", "0/0/5", "1.000", "1.000"]
    assert "coverage 94% with 5 seeds" in lines[-1] and "is 0.062" in lines[-1]


def test_median_ci_exact() -> None:
    ci = median_ci([float(v) for v in range(10, 0, -1)])
    assert (ci.median, ci.low, ci.high) == (5.5, 2.0, 9.0)
    assert ci.coverage == 1 - 2 * 11 / 1024
    few = median_ci([3.0, 1.0, 2.0])
    assert (few.median, few.low, few.high, few.coverage) == (2.0, 1.0, 3.0, 0.75)
    with pytest.raises(ValueError):
        median_ci([])


def test_paired_tests_exact() -> None:
    y = [0.0] * 5
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5], y) == (15.0, 2 / 32)
    assert wilcoxon_signed_rank([1, -2, 3, 4, 5], y) == (13.0, 6 / 32)  # W+ >= 13 or <= 2
    assert wilcoxon_signed_rank([1, 1, 2], [0, 0, 0]) == (6.0, 2 / 8)  # tied ranks 1.5, 1.5
    assert wilcoxon_signed_rank([1, 1, -2], [0, 0, 0]) == (3.0, 1.0)
    assert wilcoxon_signed_rank([1, 2], [1, 2]) == (0.0, 1.0)
    assert sign_test([1, 2, 3, 4, 5], y) == 2 / 32
    assert sign_test([1, 2, 3, 4, 0], y) == 2 / 16  # the tie is dropped
    assert sign_test([1, -1], [0, 0]) == 1.0
    with pytest.raises(ValueError, match="length"):
        sign_test([1], [1, 2])


def _gaps(trace: Any) -> list[float]:
    times = [0.0] + [r.arrival for r in trace]
    return [b - a for a, b in zip(times, times[1:])]


def test_traces_are_deterministic_per_seed() -> None:
    for gen in (mixed_trace, bursty_trace, diurnal_trace):
        assert gen(7) == gen(7)
        assert gen(7) != gen(8)


def test_bursty_trace_rate_and_burstiness() -> None:
    trace = bursty_trace(1, num_requests=4000, rate=6.0, burstiness=0.3)
    gaps = _gaps(trace)
    assert len(trace) / trace[-1].arrival == pytest.approx(6.0, rel=0.1)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(0.3), rel=0.15)  # Gamma: CV = 1/sqrt(shape)
    poisson = _gaps(mixed_trace(1, num_long=1000, num_short=3000))
    assert statistics.pstdev(poisson) / statistics.fmean(poisson) == pytest.approx(1.0, rel=0.1)
    lens = sorted(r.prompt_len for r in trace)
    assert statistics.median(lens) == pytest.approx(96, rel=0.1)
    assert lens[0] >= 4 and lens[-1] <= 896


def test_diurnal_trace_follows_the_sinusoid() -> None:
    trace = diurnal_trace(2, num_requests=6000, rate=5.0, amplitude=0.8, period=4.0)
    assert len(trace) / trace[-1].arrival == pytest.approx(5.0, rel=0.1)
    rising = sum((r.arrival % 4.0) < 2.0 for r in trace)  # sin > 0 on the first half period
    ratio = rising / (len(trace) - rising)
    want = (1 + 2 * 0.8 / math.pi) / (1 - 2 * 0.8 / math.pi)  # integral of the rate per half
    assert ratio == pytest.approx(want, rel=0.15)
    share = sum(r.kind == "long" for r in trace) / len(trace)
    assert share == pytest.approx(0.3, abs=0.03)
    assert all(r.prompt_len >= 256 for r in trace if r.kind == "long")


def test_bench_cli_passes_goodput_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from sagellm.engine.bench import runner

    parser = argparse.ArgumentParser()
    runner.add_bench_arguments(parser)
    args = parser.parse_args(
        ["--workload", "goodput", "--seeds", "3", "--clock", "replay", "--workload-shape",
         "bursty", "--calibration", "c.json", "--slo-scale", "2", "0.5", "--no-validate",
         "--schedule-only", "--recalibrate"]
    )  # fmt: skip
    args.num_threads, args.model, args.dtype = 2, None, None
    got: list[list[str]] = []
    monkeypatch.setattr(kv_workloads, "main", got.append)
    assert runner.run_from_args(args) == 0
    assert got == [
        ["goodput", "--threads", "2", "--seeds", "3", "--clock", "replay", "--workload-shape",
         "bursty", "--calibration", "c.json", "--slo-scale", "2.0", "0.5", "--no-validate",
         "--schedule-only", "--recalibrate", "--validate-runs", "3"]
    ]  # fmt: skip


def test_validation_compares_the_replay_with_the_median_of_the_real_runs() -> None:
    def run(ttft: list[float], tpot: list[float], wall: float) -> kv_workloads.RunResult:
        return kv_workloads.RunResult("r", [[1]] * len(ttft), ttft, tpot, wall, {})

    reals = [
        run([0.1, 0.2, 0.3], [0.010, 0.020, 0.030], 2.0),
        run([0.4, 0.5, 0.6], [0.040, 0.050, 0.060], 4.0),
        run([0.2, 0.3, 0.4], [0.020, 0.030, 0.040], 3.0),
    ]
    replay = run([0.15, 0.15, 0.15], [0.036, 0.036, 0.036], 2.7)
    rows = [line.split() for line in kv_workloads.validation_table(reals, replay).splitlines()]
    by_metric = {" ".join(r[:2]): r[2:] for r in rows if r[0] in ("TTFT", "TPOT")}
    # TTFT p50 per run: 0.2, 0.5, 0.3 -> median 0.3; replay 0.15 -> 0.50
    assert by_metric["TTFT p50"] == ["300.0", "200.0-500.0", "150.0", "0.50"]
    # TPOT p50 per run: 0.02, 0.05, 0.03 -> median 0.03; replay 0.036 -> 1.20
    assert by_metric["TPOT p50"] == ["30.0", "20.0-50.0", "36.0", "1.20"]
    (makespan,) = [r for r in rows if r[0] == "makespan"]
    assert makespan[1:] == ["3000.0", "2000.0-4000.0", "2700.0", "0.90"]
    with pytest.raises(ValueError, match="at least one real run"):
        kv_workloads.validation_table([], replay)


def test_goodput_workload_shapes_and_slos() -> None:
    mixed = kv_workloads.goodput_workload("mixed", 1)
    assert len(mixed) == 48 and {r.slo for r in mixed} == {
        SLO(ttft_ms=3000.0, tpot_ms=250.0),
        SLO(ttft_ms=1000.0, tpot_ms=250.0),
    }
    assert kv_workloads.goodput_workload("mixed", 1) == mixed  # seeded
    # with a predictor the mixed shape derives its SLOs too (default scales)
    derived = kv_workloads.goodput_workload("mixed", 1, PRED)
    k_ttft, k_tpot = kv_workloads.SLO_SCALES["mixed"]
    _, step = kv_workloads.expected_step(mixed_trace(1), PRED)
    assert [r.prompt for r in derived] == [r.prompt for r in mixed]
    for r in derived:
        assert r.slo == SLO(
            ttft_ms=1000.0 * k_ttft * (PRED.prefill_seconds(len(r.prompt), 256) + step),
            tpot_ms=1000.0 * k_tpot * step,
        )
    bursty = kv_workloads.goodput_workload("bursty", 2, PRED, slo_scale=(2.0, 1.0))
    trace = bursty_trace(2)
    _, step = kv_workloads.expected_step(trace, PRED)
    for r, t in zip(bursty, trace):
        assert len(r.prompt) == t.prompt_len and r.arrival == t.arrival
        assert r.slo == SLO(
            ttft_ms=1000.0 * 2.0 * (PRED.prefill_seconds(t.prompt_len, 256) + step),
            tpot_ms=1000.0 * step,
        )
    with pytest.raises(ValueError, match="predictor"):
        kv_workloads.goodput_workload("diurnal", 1)
    with pytest.raises(ValueError, match="mixed, bursty, diurnal"):
        kv_workloads.goodput_workload("flat", 1, PRED)


def test_real_goodput_line_reports_the_spread() -> None:
    reals = [_run("fcfs", 1, met, 2.0) for met in (10, 12, 11)]
    line = kv_workloads.real_goodput_line(reals, _run("fcfs", 1, 11, 2.2))
    assert line == (
        "fcfs goodput on the real clock: 5.00 (10 met), 6.00 (12 met), 5.50 (11 met) req/s; "
        "max - min = 18% of the median; replay 5.00 (11 met)"
    )


def test_recalibrate_fits_again_and_saves_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagellm.engine.bench import replay as bench_replay

    path = tmp_path / "calib.json"
    PRED.save(path)
    fitted = StepCostPredictor((1e-3, 2e-4, 3e-4, 4e-6), model="m")
    calls: list[tuple[str, int]] = []

    def fake(model: str, threads: int, **_: Any) -> StepCostPredictor:
        calls.append((model, threads))
        return fitted

    monkeypatch.setattr(bench_replay, "calibrate", fake)
    got, where = bench_replay.load_or_calibrate(path, "m", 2)
    assert got.coefficients[:4] == PRED.coefficients[:4] and calls == []  # kept
    got, where = bench_replay.load_or_calibrate(path, "m", 2, fresh=True)
    assert calls == [("m", 2)] and where == path
    assert StepCostPredictor.load(path).coefficients == fitted.coefficients
