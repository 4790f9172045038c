"""``python -m sagellm.overlap.bench``: serialised vs overlapped tensor-parallel MLP.

Runs :func:`sagellm.overlap.programs.measure` on ``--ranks`` processes (gloo on CPU,
nccl on CUDA with ``--device cuda``) and prints the four medians (compute alone,
communication alone, serialised step, overlapped step), the share of communication
hidden, the speedup over the serialised step and the idle shares. Every figure is per
step; the slowest rank's median is reported for each.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sagellm.overlap.launch import run_ranks
from sagellm.overlap.programs import VARIANTS, Workload, measure, overlap_metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sagellm.overlap.bench", description=__doc__)
    p.add_argument("--reps", type=int, default=9, help="interleaved repetitions (median)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error(f"--reps must be >= 1, got {a.reps}")
    w = Workload(a.layers, a.hidden, a.ffn, a.tokens, a.micro_batches)
    per_rank = run_ranks(
        a.ranks, measure, w, a.reps, device=a.device, timeout_s=a.timeout, threads=a.threads
    )
    t = {k: max(r[k] for r in per_rank) for k in per_rank[0] if k != "reps"}
    m = overlap_metrics(t)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"tensor-parallel MLP: {a.ranks} ranks x {a.threads} thread(s), {a.layers} layers, "
        f"hidden {a.hidden}, ffn {a.ffn}, {a.tokens} tokens in {a.micro_batches} "
        f"micro-batches, {a.reps} interleaved reps, device {a.device}, loadavg {load:.2f}"
    )
    names = {
        "compute": "compute alone",
        "communicate": "communication alone",
        "serial": "serialised step",
        "overlap": "overlapped step",
    }
    for v in VARIANTS:
        print(f"  {names[v]:<22} {t[v] * 1e3:9.3f} ms")
    print("  where the time goes (ms inside compute / starting collectives / waiting):")
    for v in VARIANTS:
        print(
            f"    {names[v]:<20} {t[v + '_compute_s'] * 1e3:9.3f} "
            f"{t[v + '_start_s'] * 1e3:9.3f} {t[v + '_wait_s'] * 1e3:9.3f}"
        )
    print(f"  hidden communication  {m['hidden'] * 100:8.1f} %")
    print(f"  speedup vs serialised {m['speedup']:8.3f} x")
    print(
        f"  idle share            {m['idle_overlap'] * 100:8.1f} % overlapped, "
        f"{m['idle_serial'] * 100:.1f} % serialised"
    )
    print(
        f"  compute inflation     {m['compute_inflation']:8.3f} x (compute inside overlap / alone)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
