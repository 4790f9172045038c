"""Calibrate the replay clock's step-cost predictor on this machine and model.

``python -m sagellm.engine.bench.replay calibrate --model smollm2-135m --threads 2 --out
calib.json`` times real engine steps over a short grid (prefill chunks of several sizes
and contexts, decode batches of several sizes and contexts), takes the median of each
grid point, fits :class:`~sagellm.engine.replay.StepCostPredictor` by least squares and
saves it with the CPU model name. ``--clock replay`` benchmarks load that file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sagellm.core.types import SamplingParams
from sagellm.engine.replay import RealClock, StepCostPredictor, StepShape, cpu_model_name

__all__ = [
    "CALIBRATION_OPTIONS",
    "calibrate",
    "calibrate_engine",
    "default_calibration_path",
    "load_or_calibrate",
    "main",
]

#: Engine options of the calibration, the same as the goodput benchmark's engines.
CALIBRATION_OPTIONS: dict[str, Any] = {"max_model_len": 1024, "max_num_batched_tokens": 256}

#: Prefill grid: (prompt tokens, chunk) — chunks past the first see a longer context.
PREFILL_GRID = (16, 64, 128, 256, 768)
#: Decode grid: (batch rows, context tokens).
DECODE_GRID = ((1, 32), (2, 32), (4, 32), (6, 32), (16, 32), (32, 32), (1, 384), (8, 384))


class _RecordingClock(RealClock):
    """The real clock, remembering the shape of the step it last saw."""

    last: StepShape | None = None

    def advance(self, out: Any) -> None:
        self.last = StepShape.of(out)


def _timed_steps(engine: Any, prompts: Sequence[list[int]], max_tokens: int, tag: str) -> list[
    tuple[StepShape, float]
]:  # fmt: skip
    """Run ``prompts`` together to completion; every computing step's shape and seconds."""
    clock = engine.clock
    assert isinstance(clock, _RecordingClock)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, sp)
    samples: list[tuple[StepShape, float]] = []
    while engine.has_unfinished_requests():
        clock.last = None
        t0 = time.perf_counter()
        engine.step(unfinished_outputs=False)
        dt = time.perf_counter() - t0
        if clock.last is not None:
            samples.append((clock.last, dt))
    return samples


def calibrate_engine(
    engine: Any,
    *,
    repeats: int = 3,
    prefill_grid: Sequence[int] = PREFILL_GRID,
    decode_grid: Sequence[tuple[int, int]] = DECODE_GRID,
    mixed: bool = True,
    progress: Callable[[str], None] | None = None,
    **meta: Any,
) -> StepCostPredictor:
    """Fit a predictor from timed steps of ``engine`` (its clock is replaced by a recording
    real clock). Each grid point runs ``repeats`` times; one sample per kind of step and
    point: the median seconds and the median shape; with ``mixed``, every step of
    ``repeats`` bursts of long and short prompts together is a sample too."""
    import random

    engine.set_clock(_RecordingClock())
    rng = random.Random(0)

    lo, hi = (100, 20000) if engine.vocab_size > 20000 else (1, engine.vocab_size)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    # warm every shape once, untimed
    _timed_steps(engine, [tokens(min(256, engine.max_model_len // 2))], 4, "warm")
    _timed_steps(engine, [tokens(32) for _ in range(8)], 4, "warm-d")
    points: list[tuple[StepShape, float]] = []
    for n in prefill_grid:
        if progress:
            progress(f"calibrating: prefill {n} tokens")
        by_chunk: dict[int, list[tuple[StepShape, float]]] = {}
        for r in range(repeats):
            steps = _timed_steps(engine, [tokens(n)], 1, f"p{n}-{r}")
            for k, (shape, dt) in enumerate(s for s in steps if s[0].prefill_tokens):
                by_chunk.setdefault(k, []).append((shape, dt))
        points.extend(_median_point(v) for v in by_chunk.values())
    for rows, ctx in decode_grid:
        if progress:
            progress(f"calibrating: decode {rows} rows at {ctx} tokens of context")
        decodes: list[tuple[StepShape, float]] = []
        for r in range(repeats):
            steps = _timed_steps(engine, [tokens(ctx) for _ in range(rows)], 6, f"d{rows}-{r}")
            decodes.extend(s for s in steps if not s[0].prefill_tokens and s[0].decode_rows == rows)
        if decodes:
            points.append(_median_point(decodes))
    # Serving mixes prefill chunks with decodes at every context: a burst of long and
    # short prompts contributes each of its steps as a sample of its own.
    for r in range(repeats if mixed else 0):
        if progress:
            progress(f"calibrating: mixed burst {r + 1}/{repeats}")
        long_len = min(768, engine.max_model_len - 24)
        prompts = [tokens(long_len) for _ in range(3)] + [tokens(32) for _ in range(12)]
        rng.shuffle(prompts)
        points.extend(_timed_steps(engine, prompts, 16, f"m{r}"))
    engine.set_clock(RealClock())
    runtime = getattr(getattr(engine, "parts", None), "runtime", None)
    dense = getattr(runtime, "dense_rows", None)
    dense_rows = int(dense.get("rows", 0)) if isinstance(dense, dict) else 0
    return StepCostPredictor.fit(points, dense_rows=dense_rows, cpu=cpu_model_name(), **meta)


def _median_point(samples: Sequence[tuple[StepShape, float]]) -> tuple[StepShape, float]:
    def med(values: list[int]) -> int:
        return int(statistics.median(values))

    shape = StepShape(
        med([s.prefill_tokens for s, _ in samples]),
        med([s.decode_rows for s, _ in samples]),
        med([s.decode_tokens for s, _ in samples]),
        med([s.attention_pairs for s, _ in samples]),
    )
    return shape, statistics.median(t for _, t in samples)


def calibrate(
    model: str = "smollm2-135m",
    threads: int = 2,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> StepCostPredictor:
    """Build the benchmark's engine for ``model`` and fit its step costs."""
    from sagellm.engine.bench.kv_workloads import _engine

    opts = {**CALIBRATION_OPTIONS, **options}
    engine = _engine(model, threads, **opts)
    return calibrate_engine(
        engine,
        repeats=repeats,
        progress=progress,
        model=model,
        num_threads=threads,
        engine_options=opts,
    )


def default_calibration_path(model: str, threads: int) -> Path:
    """Where a calibration is kept when no file is named: the user cache folder."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model)
    return root / "sagellm" / f"replay-{safe}-{threads}t.json"


def load_or_calibrate(
    path: str | Path | None, model: str, threads: int, *, fresh: bool = False
) -> tuple[StepCostPredictor, Path]:
    """The predictor in ``path``; without ``path``, the default file, calibrated (with a
    progress line on stderr) and saved there when missing. A named file that is missing
    is an error that says how to make it. ``fresh``: calibrate now whatever exists and
    save to ``path`` (or the default file), so the steps are priced as the machine runs
    them in this session."""
    target = Path(path) if path is not None else default_calibration_path(model, threads)
    if not fresh:
        if path is not None:
            return StepCostPredictor.load(path), Path(path)
        if target.exists():
            return StepCostPredictor.load(target), target
    why = "recalibrating" if fresh else "no step-cost calibration"
    print(
        f"{why} for {model} at {threads} threads: calibrating (saved to {target})",
        file=sys.stderr,
    )
    pred = calibrate(model, threads, progress=lambda m: print(m, file=sys.stderr))
    target.parent.mkdir(parents=True, exist_ok=True)
    pred.save(target)
    return pred, target


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sagellm.engine.bench.replay")
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="time real steps and fit the step-cost predictor")
    cal.add_argument("--model", default="smollm2-135m")
    cal.add_argument("--threads", type=int, default=2)
    cal.add_argument("--repeats", type=int, default=3, help="runs per grid point (median)")
    cal.add_argument("--out", help="JSON file to write (default: the user cache folder)")
    args = parser.parse_args(argv)
    pred = calibrate(
        args.model, args.threads, args.repeats, progress=lambda m: print(m, file=sys.stderr)
    )
    out = Path(args.out) if args.out else default_calibration_path(args.model, args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    pred.save(out)
    coef = ", ".join(f"{k}={v:.3g}" for k, v in pred.to_json()["coefficients"].items())
    print(f"{out}: {coef} s; median relative error {pred.residual:.1%}; cpu {pred.cpu!r}")


if __name__ == "__main__":
    main()
