"""The engine's perf gate: exact counters and interleaved timing ratios.

``nox -s perf_gate`` runs ``python -m sagellm.engine.bench.perf_gate``; it fails when

1. a **deterministic counter** of a fixed workload differs from the one stored in
   ``sagellm-engine/perf/baseline.json``: forward steps, scheduled, prompt and
   generated tokens, preemptions, KV blocks allocated, freed and at peak, prefix-cache
   lookups, hits and matched tokens. The workloads run on the tiny random model of
   :mod:`sagellm.engine.testing` with end of sequence ignored, so the counters depend on
   the scheduler, the KV pool and the prefix index only, never on timing or numerics;
   they are gated exactly, and a mismatch names the counter and both values;
2. a **timing** of the embedded model is slower than the reference by more than the
   threshold *and* the difference is significant. Timings from another machine, or
   another hour of this one, are meaningless here, so the reference is measured in the
   same job: the engine at the commit the baseline file names, installed from that
   revision into its own venv (``nox -s perf_gate`` builds it from ``git archive`` under
   ``.nox/perf_gate-ref/``), both engines in worker processes, sampled alternately
   (A B A B). The rule is asv's (``asv compare`` / ``continuous``): a change counts only
   when the ratio of medians passes the threshold and the two sample sets differ, by a
   two-sided Mann-Whitney U test at p < 0.05 when the sample sizes allow that p, else by
   their [min, max] intervals not overlapping.

Why that reference and not a machine-speed probe: the matmul peak moves with the load
differently from a memory-bound decode step (FIELD-NOTES: 2x swings under load), so
figure / peak is not stable across runs; the same engine at the baseline revision feels
the same load as the candidate when both are interleaved, and a ratio near 1 is what an
unchanged engine shows.

``--quick`` (the form ``nox -s test`` runs): the same counters, a small timing workload,
4 rounds and a loose threshold (2x), so only a gross regression fails CI.
``--update`` rewrites the stored counters and the baseline commit (``git rev-parse
HEAD``): run it on a committed tree, and commit the file with the change that moved them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COUNTER_WORKLOADS",
    "CounterWorkload",
    "Verdict",
    "check_counters",
    "collect_counters",
    "is_different",
    "judge",
    "main",
    "mann_whitney_u",
    "read_baseline",
    "write_baseline",
]

FORMAT = 1
DEFAULT_ALPHA = 0.05
FULL_THRESHOLD = 1.10  # asv's default factor
QUICK_THRESHOLD = 2.0

# ---------------------------------------------------------------------- statistics


def _u_counts(m: int, n: int) -> list[int]:
    """Number of orderings of m x's and n y's giving each U in 0..m*n (exact null law)."""
    # f[i][j] holds the counts for i x's and j y's; adding one more x (the largest value)
    # beats all j y's, adding one more y beats nothing.
    f: list[list[list[int]]] = [[[1] for _ in range(n + 1)] for _ in range(m + 1)]
    for i in range(m + 1):
        for j in range(n + 1):
            if i == 0 or j == 0:
                f[i][j] = [1] + [0] * (i * j)
                continue
            a, b = f[i - 1][j], f[i][j - 1]  # last is an x (adds j), last is a y
            out = [0] * (i * j + 1)
            for u, c in enumerate(a):
                out[u + j] += c
            for u, c in enumerate(b):
                out[u] += c
            f[i][j] = out
    return f[m][n]


def mann_whitney_u(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """U statistic of ``x`` (pairs where x > y, ties counted half) and the two-sided
    p-value: exact for samples up to 20 each, normal approximation above.

    Ties are broken the least significant way (the p-value is then conservative).
    """
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError("both samples need at least one value")
    greater = sum(1 for a in x for b in y if a > b)
    ties = sum(1 for a in x for b in y if a == b)
    u = greater + ties / 2
    # the tie split closest to the centre gives the largest p
    centre = m * n / 2
    lo, hi = greater, greater + ties
    nearest = min(max(centre, lo), hi)
    dist = abs(nearest - centre)
    if max(m, n) <= 20:
        counts = _u_counts(m, n)
        total = math.comb(m + n, m)
        # P(|U - centre| >= dist) under the null
        tail = sum(c for k, c in enumerate(counts) if abs(k - centre) >= dist - 1e-9)
        return u, min(1.0, tail / total)
    var = m * n * (m + n + 1) / 12
    z = max(dist - 0.5, 0.0) / math.sqrt(var)  # continuity correction
    return u, min(1.0, math.erfc(z / math.sqrt(2)))


def min_p_value(m: int, n: int) -> float:
    """The smallest two-sided p a Mann-Whitney test of sizes m and n can give."""
    return 2 / math.comb(m + n, m)


def is_different(a: Sequence[float], b: Sequence[float], alpha: float = DEFAULT_ALPHA) -> bool:
    """Whether two sample sets differ significantly (asv's rule).

    Mann-Whitney U at ``alpha`` when the sizes can reach it; otherwise (too few samples)
    the pessimistic check that the [min, max] intervals do not overlap.
    """
    if min_p_value(len(a), len(b)) < alpha:
        return mann_whitney_u(a, b)[1] < alpha
    return max(a) < min(b) or max(b) < min(a)


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one timing figure."""

    name: str
    baseline: tuple[float, ...]  # samples of the reference
    candidate: tuple[float, ...]
    ratio: float  # median(candidate) / median(baseline), oriented so > 1 is better
    threshold: float
    significant: bool
    regressed: bool
    improved: bool
    p_value: float

    def line(self) -> str:
        word = "REGRESSED" if self.regressed else "improved" if self.improved else "ok"
        sig = "significant" if self.significant else "not significant"
        return (
            f"{self.name}: candidate/baseline {self.ratio:.3f} (threshold 1/{self.threshold:g}"
            f" = {1 / self.threshold:.3f}), p={self.p_value:.3f}, {sig}: {word}"
        )


def judge(
    name: str,
    baseline: Sequence[float],
    candidate: Sequence[float],
    *,
    threshold: float = FULL_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    higher_is_better: bool = True,
) -> Verdict:
    """A regression is a ratio beyond ``threshold`` in the bad direction that is also
    significant (:func:`is_different`); an improvement the same the other way."""
    if threshold < 1:
        raise ValueError("threshold is a factor >= 1 (1.10 = 10%)")
    mb, mc = statistics.median(baseline), statistics.median(candidate)
    ratio = (mc / mb if mb else math.inf) if higher_is_better else (mb / mc if mc else math.inf)
    significant = is_different(baseline, candidate, alpha)
    return Verdict(
        name=name,
        baseline=tuple(baseline),
        candidate=tuple(candidate),
        ratio=ratio,
        threshold=threshold,
        significant=significant,
        regressed=significant and ratio < 1 / threshold,
        improved=significant and ratio > threshold,
        p_value=mann_whitney_u(candidate, baseline)[1],
    )


# ---------------------------------------------------------------------- counters


@dataclass(frozen=True)
class CounterWorkload:
    """A fixed workload: engine options and waves of (prompt length, max_tokens).

    Each wave is added at once and run to completion before the next; ``shared_prefix``
    tokens (the same for every request) start every prompt.
    """

    name: str
    options: Mapping[str, Any]
    waves: tuple[tuple[tuple[int, int], ...], ...]
    shared_prefix: int = 0
    needs: str | None = None  # module that must be importable (a research package)


COUNTER_WORKLOADS: tuple[CounterWorkload, ...] = (
    # continuous batching of mixed lengths with the default scheduler and budget
    CounterWorkload(
        "batch",
        {"num_blocks": 256},
        (((5, 8), (17, 16), (33, 4), (40, 12), (64, 8), (9, 20)),),
    ),
    # a prompt longer than the step's token budget: chunked prefill
    CounterWorkload(
        "chunked",
        {"num_blocks": 256, "max_num_batched_tokens": 64},
        (((300, 4), (20, 6)),),
    ),
    # a pool too small for the batch: preemption and recomputation
    CounterWorkload(
        "preempt",
        {"num_blocks": 14, "block_size": 4, "max_model_len": 48},
        (((16, 12), (16, 12), (16, 12), (16, 12)),),
    ),
    # one request warms the prefix index, then five share its 48-token prefix
    CounterWorkload(
        "prefix",
        {"num_blocks": 256, "prefix_cache": "radix"},
        (((8, 4),), ((8, 4), (12, 4), (16, 4), (4, 4), (24, 4))),
        shared_prefix=48,
        needs="sagellm.prefix_cache",
    ),
)

#: Components whose integer stats fields are gated (timing-free by construction).
_COUNTED = ("engine", "scheduler", "kv_pool", "prefix_index")
#: Engine options every counter workload shares. Kernels stay eager: they change no
#: counter, and a kernel provider may compile on first use (minutes, once per machine).
_COUNTER_OPTIONS = {
    "dtype": "float32",
    "num_threads": 1,
    "seed": 0,
    "max_model_len": 512,
    "kernels": "eager",
}


def _int_fields(stats: object) -> dict[str, int]:
    if not dataclasses.is_dataclass(stats):
        return {}
    out = {}
    for f in dataclasses.fields(stats):
        v = getattr(stats, f.name)
        if isinstance(v, int) and not isinstance(v, bool):
            out[f.name] = v
    return out


def run_counter_workload(llm: Any, workload: CounterWorkload) -> dict[str, int]:
    """Counters of one workload on a fresh engine (``llm``), as ``component.field``."""
    from sagellm.core.types import SamplingParams
    from sagellm.engine.bench.workloads import random_prompts

    engine = llm.engine
    pool = engine.kv_pool
    engine.component_stats()  # drop whatever building the engine counted
    vocab = engine.vocab_size
    prefix = (
        random_prompts(1, workload.shared_prefix, vocab, 1)[0] if workload.shared_prefix else []
    )
    peak = 0
    steps = 0
    for w, wave in enumerate(workload.waves):
        for i, (length, max_tokens) in enumerate(wave):
            prompt = prefix + random_prompts(1, length, vocab, 100 * w + i)[0]
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(f"{workload.name}-{w}-{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            peak = max(peak, pool.num_blocks - pool.num_free_blocks)
            if steps > 10_000:
                raise RuntimeError(f"counter workload {workload.name!r} does not finish")
    out: dict[str, int] = {"loop.num_step_calls": steps, "kv_pool.peak_used_blocks": peak}
    for component, stats in engine.component_stats().items():
        if component in _COUNTED:
            for key, value in _int_fields(stats).items():
                out[f"{component}.{key}"] = value
    return dict(sorted(out.items()))


def collect_counters(
    model: str | Path,
    workloads: Sequence[CounterWorkload] = COUNTER_WORKLOADS,
    *,
    make_llm: Callable[..., Any] | None = None,
) -> dict[str, dict[str, int]]:
    """Counters of every workload, each on a fresh engine over ``model``."""
    import importlib.util

    if make_llm is None:
        from sagellm.engine.llm import LLM

        make_llm = LLM
    out = {}
    for workload in workloads:
        if workload.needs and importlib.util.find_spec(workload.needs) is None:
            raise RuntimeError(
                f"counter workload {workload.name!r} needs {workload.needs}, which is not "
                "installed: run the gate in the full environment (`nox -s perf_gate`)"
            )
        llm = make_llm(model=str(model), **{**_COUNTER_OPTIONS, **workload.options})
        out[workload.name] = run_counter_workload(llm, workload)
    return out


def check_counters(
    stored: Mapping[str, Mapping[str, int]], measured: Mapping[str, Mapping[str, int]]
) -> tuple[list[str], list[str]]:
    """(failures, notes): a stored counter that differs or is missing fails; a counter
    the baseline does not know yet is a note (``--update`` records it)."""
    failures: list[str] = []
    notes: list[str] = []
    for workload, counters in stored.items():
        got = measured.get(workload)
        if got is None:
            failures.append(f"workload {workload!r}: in the baseline but not measured")
            continue
        for key, want in counters.items():
            if key not in got:
                failures.append(f"counter {workload}/{key}: baseline {want}, not measured")
            elif got[key] != want:
                failures.append(f"counter {workload}/{key}: baseline {want}, measured {got[key]}")
        for key in sorted(set(got) - set(counters)):
            notes.append(f"counter {workload}/{key} = {got[key]} is new (not in the baseline)")
    for workload in sorted(set(measured) - set(stored)):
        notes.append(f"workload {workload!r} is new (not in the baseline)")
    return failures, notes


# ---------------------------------------------------------------------- baseline file


def default_baseline_path() -> Path:
    """``sagellm-engine/perf/baseline.json`` of the source tree this module runs from."""
    return Path(__file__).resolve().parents[4] / "perf" / "baseline.json"


def read_baseline(path: Path) -> dict[str, Any]:
    """The stored baseline (``{"format", "commit", "counters", ...}``)."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, this gate reads {FORMAT}")
    return data


def write_baseline(path: Path, counters: Mapping[str, Mapping[str, int]], commit: str) -> None:
    """Store ``counters`` and the reference ``commit`` (stable order, one file)."""
    data = {
        "format": FORMAT,
        "commit": commit,
        "note": (
            "Counters of sagellm.engine.bench.perf_gate.COUNTER_WORKLOADS, gated exactly; "
            "timings are gated against the engine at `commit`, measured in the same job. "
            "Rewrite with `nox -s perf_gate -- --update`."
        ),
        "counters": {k: dict(sorted(v.items())) for k, v in sorted(counters.items())},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


# ---------------------------------------------------------------------- timings


@dataclass(frozen=True)
class TimingPlan:
    """The timing half of the gate: workload, rounds, threshold."""

    num_requests: int
    prompt_len: int
    output_len: int
    decode_len: int
    prefill_len: int
    rounds: int
    threshold: float
    figures: tuple[str, ...] = ("offline", "decode_b1", "prefill")


FULL_PLAN = TimingPlan(16, 64, 32, 32, 256, rounds=6, threshold=FULL_THRESHOLD)
QUICK_PLAN = TimingPlan(
    4, 32, 8, 16, 128, rounds=4, threshold=QUICK_THRESHOLD, figures=("decode_b1", "prefill")
)


def run_timings(
    candidate_python: str,
    baseline_python: str,
    plan: TimingPlan,
    *,
    model: str = "smollm2-135m",
    threads: int = 2,
    alpha: float = DEFAULT_ALPHA,
    progress: Callable[[str], None] = lambda m: None,
) -> list[Verdict]:
    """Candidate and baseline engines in two workers, figures sampled A B A B."""
    from sagellm.engine.bench.peers import WorkerPeer, compare
    from sagellm.engine.bench.workloads import Workload

    w = Workload(
        num_requests=plan.num_requests,
        prompt_len=plan.prompt_len,
        output_len=plan.output_len,
        decode_len=plan.decode_len,
        prefill_len=plan.prefill_len,
    )
    options = {"num_threads": threads}
    progress("starting the candidate and the baseline engines")
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(WorkerPeer, name, python, "sagellm", model, options=options)
            for name, python in (("candidate", candidate_python), ("baseline", baseline_python))
        ]
        workers = []
        errors = []
        for f in futures:
            try:
                workers.append(f.result())
            except Exception as exc:
                errors.append(exc)
    try:
        if errors:
            raise RuntimeError(f"an engine failed to start: {errors[0]}")
        candidate, baseline = workers
        vocab = 32000  # random_prompts draws ids below 32000: valid for any Llama vocabulary
        comps = compare(
            candidate,
            baseline,
            w,
            vocab,
            rounds=plan.rounds,
            figures=plan.figures,
            progress=progress,
        )
    finally:
        for worker in workers:
            worker.close()
    return [judge(c.figure, c.theirs, c.ours, threshold=plan.threshold, alpha=alpha) for c in comps]


# ---------------------------------------------------------------------- command line


def _tiny_model(folder: Path) -> Path:
    from sagellm.engine.testing import make_tiny_llama

    return make_tiny_llama(folder / "tiny-llama", seed=0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sagellm.engine.bench.perf_gate``: 0 passes, 1 fails."""
    p = argparse.ArgumentParser(
        prog="python -m sagellm.engine.bench.perf_gate", description=__doc__.splitlines()[0]
    )
    p.add_argument("--baseline", type=Path, default=None, help="stored baseline JSON")
    p.add_argument("--update", action="store_true", help="rewrite the stored baseline")
    p.add_argument("--quick", action="store_true", help="CI form: small timing, loose ratio")
    p.add_argument("--counters-only", action="store_true", help="gate the counters only")
    p.add_argument(
        "--baseline-python",
        help="interpreter with the engine at the baseline commit (nox -s perf_gate builds it)",
    )
    p.add_argument("--threshold", type=float, help="timing factor (default 1.10, quick 2.0)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level")
    p.add_argument("--rounds", type=int, help="samples per side (default 6, quick 4)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each engine")
    p.add_argument("--model", default="smollm2-135m", help="model of the timing half")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = p.parse_args(argv)

    def progress(msg: str) -> None:
        print(f"[perf_gate] {msg}", file=sys.stderr, flush=True)

    path = args.baseline or default_baseline_path()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sagellm-perf-gate-") as tmp:
        progress("counters of the fixed workloads (tiny model)")
        measured = collect_counters(_tiny_model(Path(tmp)))
    progress(f"counters measured in {time.perf_counter() - t0:.1f} s")

    if args.update:
        root = Path(__file__).resolve().parents[5]
        commit = _git("rev-parse", "HEAD", cwd=root)
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", cwd=root)
        write_baseline(path, measured, commit)
        print(f"wrote {path}: {sum(map(len, measured.values()))} counters, commit {commit[:12]}")
        if dirty:
            print(
                "note: the working tree has uncommitted changes; the timing reference is "
                f"commit {commit[:12]} without them"
            )
        return 0

    failures: list[str] = []
    notes: list[str] = []
    stored = read_baseline(path)
    f, n = check_counters(stored["counters"], measured)
    failures += f
    notes += n
    print(f"counters: {sum(map(len, measured.values()))} checked, {len(f)} differ")

    verdicts: list[Verdict] = []
    if not args.counters_only:
        if not args.baseline_python:
            notes.append(
                "timings not gated: no --baseline-python (nox -s perf_gate builds the "
                f"baseline engine of commit {stored['commit'][:12]})"
            )
        else:
            base = QUICK_PLAN if args.quick else FULL_PLAN
            plan = dataclasses.replace(
                base,
                rounds=args.rounds or base.rounds,
                threshold=args.threshold or base.threshold,
            )
            t1 = time.perf_counter()
            verdicts = run_timings(
                sys.executable,
                args.baseline_python,
                plan,
                model=args.model,
                threads=args.threads,
                alpha=args.alpha,
                progress=progress,
            )
            progress(f"timings measured in {time.perf_counter() - t1:.1f} s")
            for v in verdicts:
                print(v.line())
                if v.regressed:
                    failures.append(v.line())
    for line in notes:
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "counters": measured,
                    "failures": failures,
                    "notes": notes,
                    "timings": [dataclasses.asdict(v) for v in verdicts],
                    "baseline_commit": stored["commit"],
                },
                indent=2,
            )
        )
    if failures:
        print("perf gate FAILED:")
        for line in failures:
            print("  " + line)
        print("(an intended change: `nox -s perf_gate -- --update` and commit the baseline)")
        return 1
    print(f"perf gate passed ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
