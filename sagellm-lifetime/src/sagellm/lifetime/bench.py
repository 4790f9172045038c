"""Accuracy and speed of the online predictor next to its baselines.

``python -m sagellm.lifetime.bench`` generates a seeded trace (30 simulated minutes at 6
requests/s by default: chats, completions, few-shot templates, one-off prompts), scores
every predictor on the held-out second half of the trace in four segments (predict
first, then observe; see :mod:`sagellm.lifetime.evaluate`), and times ``predict`` and
``observe``. The asv suite in ``benchmarks/`` uses the same functions.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable
from typing import Any

from sagellm.lifetime.baselines import LastGapPredictor, MostFrequentBucketPredictor
from sagellm.lifetime.buckets import TtlBuckets
from sagellm.lifetime.config import OnlineLifetimePredictorConfig
from sagellm.lifetime.evaluate import evaluate
from sagellm.lifetime.predictor import OnlineLifetimePredictor
from sagellm.lifetime.trace import KVAccess, TraceConfig, generate_trace

__all__ = ["PREDICTORS", "accuracy", "format_table", "main", "run", "time_predictor"]

#: Predictors compared, ours first.
PREDICTORS: dict[str, Callable[[], Any]] = {
    "online": OnlineLifetimePredictor,
    "last_gap": LastGapPredictor,
    "most_frequent": MostFrequentBucketPredictor,
}


def accuracy(trace_config: TraceConfig, num_segments: int = 4) -> dict[str, list[float]]:
    """Per predictor, the bucket accuracy of each held-out segment plus the overall last.

    ``online_frozen`` is the online predictor that stops learning at the split.
    """
    trace = generate_trace(trace_config)
    buckets = TtlBuckets(OnlineLifetimePredictorConfig().ttl_bucket_edges)
    end = trace_config.duration_s
    scores = evaluate(PREDICTORS, trace, buckets, end, 0.5, num_segments)
    frozen = {"online_frozen": PREDICTORS["online"]}
    scores.update(evaluate(frozen, trace, buckets, end, 0.5, num_segments, learn_online=False))
    out = {}
    for name, segs in scores.items():
        total = sum(s.num_scored for s in segs)
        overall = sum(s.num_correct for s in segs) / total if total else 0.0
        out[name] = [s.accuracy for s in segs] + [overall]
    return out


def time_predictor(
    factory: Callable[[], Any], trace: list[KVAccess], num_predictions: int = 20000
) -> dict[str, float]:
    """Mean observe cost, mean predict cost, and p50/p99 of single predict calls (us)."""
    predictor = factory()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for a in trace:
            predictor.observe(a.key, a.features, a.time)
        observe_us = (time.perf_counter_ns() - t0) / len(trace) / 1000
        features = [a.features for a in trace[-num_predictions:]]
        predict = predictor.predict
        t0 = time.perf_counter_ns()
        for f in features:
            predict(f)
        predict_us = (time.perf_counter_ns() - t0) / len(features) / 1000
        clock = time.perf_counter_ns
        single = []
        for f in features:
            t1 = clock()
            predict(f)
            single.append(clock() - t1)
    finally:
        gc.enable()
    single.sort()

    def pct(q: float) -> float:
        return single[max(0, math.ceil(q * len(single)) - 1)] / 1000

    return {
        "observe_us": observe_us,
        "predict_us": predict_us,
        "predict_p50_us": pct(0.5),
        "predict_p99_us": pct(0.99),
    }


def run(trace_config: TraceConfig = TraceConfig()) -> dict[str, dict[str, Any]]:
    """Accuracy and timing of every predictor on one trace."""
    acc = accuracy(trace_config)
    trace = generate_trace(trace_config)
    out: dict[str, dict[str, Any]] = {}
    for name, factory in PREDICTORS.items():
        out[name] = {"accuracy": acc[name], **time_predictor(factory, trace)}
    out["online_frozen"] = {"accuracy": acc["online_frozen"]}
    out["_trace"] = {"num_accesses": len(trace)}
    return out


def format_table(trace_config: TraceConfig, results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of accuracies (per held-out segment, overall) and timings."""
    n = results["_trace"]["num_accesses"]
    lines = [
        f"trace: {trace_config.duration_s:g} s at {trace_config.request_rate:g} requests/s, "
        f"{n} KV accesses, seed {trace_config.seed}; TTL buckets <1s, 1-10s, 10-60s, "
        "60-300s, >=300s/never; scored on the held-out second half",
        "",
        "| predictor | seg 1 | seg 2 | seg 3 | seg 4 | overall | predict us (mean) "
        "| predict p50 / p99 us | observe us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        segs = " | ".join(f"{a:.3f}" for a in r["accuracy"])
        if "predict_us" in r:
            timing = (
                f"{r['predict_us']:.2f} | {r['predict_p50_us']:.2f} / "
                f"{r['predict_p99_us']:.2f} | {r['observe_us']:.2f}"
            )
        else:
            timing = "- | - | -"
        lines.append(f"| {name} | {segs} | {timing} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the comparison table."""
    parser = argparse.ArgumentParser(
        prog="python -m sagellm.lifetime.bench",
        description="Lifetime predictor accuracy and latency vs baselines on a seeded trace.",
    )
    defaults = TraceConfig()
    parser.add_argument("--rate", type=float, default=defaults.request_rate)
    parser.add_argument("--duration", type=float, default=defaults.duration_s)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = TraceConfig(duration_s=args.duration, request_rate=args.rate, seed=args.seed)
    print(format_table(config, run(config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
